"""What every job returns and writes: typed results, one provenance record, one writer, one reader.

- :class:`Provenance`: the command, the time, the library versions and the machine, recorded the
  same way by ``run``, ``eval`` and ``compare`` (flattened into each file's top level).
- :class:`RunResult` (``hpredit run``: ``summary.json``), :class:`EvalResult` (``hpredit eval``:
  ``summary.json``, ``per_question.jsonl``, ``split.json``) and :class:`CompareResult`
  (``hpredit compare``: ``results.json``).
- :func:`write_json` is the one writer of a result file (atomic: a temporary sibling renamed into
  place); :func:`load_result` the one reader, which also reads the files of earlier versions.

The JSON schema of each file is described once, in ``docs/results.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from .checks import is_int
from .errors import HpreditError
from .files import atomic_directory, read_json, write_text_atomic
from .provenance import command_line
from .provenance import machine as machine_record
from .provenance import versions as library_versions

__all__ = [
    "CompareResult",
    "CompareRow",
    "EvalResult",
    "Provenance",
    "RunResult",
    "StrengthChoice",
    "load_result",
    "sweep_figure",
    "to_jsonable",
    "write_json",
]

#: The keys of a provenance record, flattened into every result file's top level.
PROVENANCE_KEYS = ("command", "created", "versions", "machine")
#: Keys of earlier files, now inside ``versions`` (read, never written).
_OLD_PROVENANCE_KEYS = ("hpredit_version", "torch_version")


def to_jsonable(x: Any) -> Any:
    """A JSON-ready form of ``x``: dataclasses as dicts, numpy scalars as Python numbers.

    Usable as ``json.dumps(..., default=to_jsonable)``; other objects raise ``TypeError``.
    """
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def dumps(obj: Any) -> str:
    """The one JSON layout of result files: indented by 1, UTF-8 kept, a final newline."""
    return json.dumps(obj, indent=1, ensure_ascii=False, default=to_jsonable) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write one result file atomically (the old version or the new one, never half of it)."""
    return write_text_atomic(path, dumps(obj))


# --------------------------------------------------------------------------- provenance


@dataclass
class Provenance:
    """What a result was made with: the command line, when, the library versions and the machine.

    Figures computed on a CPU depend on its kernels, the thread count and the library versions
    (the order of float reductions), not only on the seeds; every result records this.
    """

    command: str
    created: str | None = None  #: local time, ``%Y-%m-%dT%H:%M:%S%z`` (None in files that predate it)
    versions: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def now(cls, command: str | None = None) -> Provenance:
        """The record of a result made now (``command``: default, this process's command line)."""
        return cls(
            command=command_line() if command is None else command,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            versions=library_versions(),
            machine=machine_record(),
        )

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "created": self.created, "versions": self.versions, "machine": self.machine}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Provenance:
        """From a file's top level; older files' ``hpredit_version`` / ``torch_version`` fill ``versions``."""
        versions = dict(d.get("versions") or {})
        if "hpredit_version" in d:
            versions.setdefault("hpredit", d["hpredit_version"])
        if "torch_version" in d:
            versions.setdefault("torch", d["torch_version"])
        command = d.get("command")
        return cls("" if command is None else str(command), d.get("created"), versions, dict(d.get("machine") or {}))


# --------------------------------------------------------------------------- field checks
# Each reader checks the JSON type of every field it uses before using it: a wrong type is one
# HpreditError naming the file and the field (not a string's characters read as rows, nor a
# KeyError or TypeError from deep inside).


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(is_int(x) for x in v)


_KINDS: dict[str, Any] = {
    "an object": lambda v: isinstance(v, dict),
    "an object or null": lambda v: v is None or isinstance(v, dict),
    "a string": lambda v: isinstance(v, str),
    "a string or null": lambda v: v is None or isinstance(v, str),
    "an integer": is_int,
    "a number": _is_number,
    "true or false": lambda v: isinstance(v, bool),
    "a list of strings": _is_str_list,
    "a list of integers": _is_int_list,
    "a list of objects": lambda v: isinstance(v, list),  # each row is checked by _rows (named by index)
    "an object mapping layers to numbers": lambda v: (
        isinstance(v, dict)
        and all(isinstance(k, str) and k.lstrip("-").isdigit() and _is_number(x) for k, x in v.items())
    ),
}


def _field(where: str, d: dict[str, Any], key: str, kind: str, prefix: str = "", *, optional: bool = False) -> Any:
    """``d[key]``, refused unless it is of ``kind`` (a key of ``_KINDS``); absent: None if ``optional``."""
    name = prefix + key
    if key not in d:
        if optional:
            return None
        raise HpreditError(f"{where}: '{name}' is missing")
    value = d[key]
    if not _KINDS[kind](value):
        raise HpreditError(f"{where}: '{name}' must be {kind}, got {_json_type(value)}")
    return value


def _rows(where: str, d: dict[str, Any], key: str, prefix: str = "", *, optional: bool = False) -> list[dict[str, Any]]:
    """``d[key]``: a list of objects (absent and ``optional``: empty)."""
    rows = _field(where, d, key, "a list of objects", prefix, optional=optional) or []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise HpreditError(f"{where}: '{prefix}{key}[{i}]' must be an object, got {_json_type(row)}")
    return rows


def _check_provenance(where: str, d: dict[str, Any]) -> None:
    _field(where, d, "command", "a string or null", optional=True)
    _field(where, d, "created", "a string or null", optional=True)
    _field(where, d, "versions", "an object or null", optional=True)
    _field(where, d, "machine", "an object or null", optional=True)
    for key in _OLD_PROVENANCE_KEYS:
        _field(where, d, key, "a string", optional=True)


def _without_provenance(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in (*PROVENANCE_KEYS, *_OLD_PROVENANCE_KEYS)}


# --------------------------------------------------------------------------- run


@dataclass
class StrengthChoice:
    """The strength a job chose on validation under the fluency-cost cap.

    ``tried``: one row per setting measured, ``{strength, k, kl, val}`` (``val`` None when the
    setting's KL is over the cap, so its validation score was not computed).
    """

    strength: float
    over_kl_cap: bool  #: no setting was under the cap: the lowest-KL one was taken
    tried: list[dict[str, Any]]
    kl_cap: float
    #: the rule: ``matched`` (the strength whose KL is the cap) or ``grid`` (best val MC2 under it)
    protocol: str = "grid"
    #: matched: ``hit`` (KL within ``kl_tol`` of the cap), ``closest`` (the search's budget ran out:
    #: the measured KL nearest the cap) or ``unreachable`` (no strength reached the cap: the largest
    #: cost reached); None under grid
    status: str | None = None
    kl: float | None = None  #: matched: the KL measured at the chosen strength
    kl_tol: float | None = None  #: matched: the relative tolerance on the cap


@dataclass
class RunEvaluation:
    """The evaluation half of ``hpredit run``: the strength chosen on val, then test unedited vs edited."""

    choice: StrengthChoice
    test: dict[str, Any]  #: the test metrics: ``unedited``, ``edited``, ``difference`` (as :class:`EvalResult`)

    def to_json(self) -> dict[str, Any]:
        c = self.choice
        return {
            "validation_sweep": c.tried,
            "kl_cap": c.kl_cap,
            "strength": c.strength,
            "over_kl_cap": c.over_kl_cap,
            **({"strength_rule": c.protocol} if c.protocol != "grid" else {}),  # absent: grid, as in older files
            **(
                {
                    "status": c.status,
                    "kl": c.kl,
                    "kl_miss": None if c.kl is None else (c.kl - c.kl_cap) / c.kl_cap,
                    "kl_tol": c.kl_tol,
                }
                if c.status is not None
                else {}
            ),
            "test": self.test,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "result file") -> RunEvaluation:
        p = "evaluation."
        _rows(where, d, "validation_sweep", p)
        _field(where, d, "strength", "a number", p)
        _field(where, d, "over_kl_cap", "true or false", p)
        _field(where, d, "kl_cap", "a number", p)
        _field(where, d, "strength_rule", "a string", p, optional=True)
        _field(where, d, "status", "a string", p, optional=True)  # matched only, as kl and kl_tol
        _field(where, d, "kl", "a number", p, optional=True)
        _field(where, d, "kl_tol", "a number", p, optional=True)
        _field(where, d, "test", "an object", p)
        choice = StrengthChoice(
            d["strength"],
            bool(d["over_kl_cap"]),
            list(d["validation_sweep"]),
            d["kl_cap"],
            d.get("strength_rule", "grid"),
            d.get("status"),
            d.get("kl"),
            d.get("kl_tol"),
        )
        return cls(choice, d["test"])


@dataclass
class RunResult:
    """What :func:`hpredit.pipeline.run` returns and writes as ``summary.json``.

    The editor itself is saved beside it (``editor/``); ``editor`` holds it in memory (not written
    here; None when read back from a file).
    """

    provenance: Provenance
    model: dict[str, Any]  #: the fitted model's fingerprint
    split_seed: int
    questions: dict[str, int]  #: questions per split fitted on (``train``, ``val``)
    pairs: int
    texts: int
    completion_tokens: int
    store_dtype: str
    layers_edited: list[int]
    val_probe_accuracy: dict[int, float]
    timing_s: dict[str, float]
    activation_store_bytes: int
    editor_bytes: int
    evaluation: RunEvaluation | None = None
    editor: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        p = self.provenance.to_json()
        return {
            "command": p["command"],
            "created": p["created"],
            "versions": p["versions"],
            "machine": p["machine"],
            "model": self.model,
            "split_seed": self.split_seed,
            "questions": self.questions,
            "pairs": self.pairs,
            "texts": self.texts,
            "completion_tokens": self.completion_tokens,
            "store_dtype": self.store_dtype,
            "layers_edited": self.layers_edited,
            "val_probe_accuracy": self.val_probe_accuracy,
            "timing_s": self.timing_s,
            "activation_store_bytes": self.activation_store_bytes,
            "editor_bytes": self.editor_bytes,
            "evaluation": None if self.evaluation is None else self.evaluation.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "result file") -> RunResult:
        """From ``summary.json`` (``where``: the file, named in errors); a field of the wrong JSON
        type is one :class:`HpreditError` naming it."""
        _check_provenance(where, d)
        for key, kind in (
            ("model", "an object"),
            ("split_seed", "an integer"),
            ("questions", "an object"),
            ("pairs", "an integer"),
            ("texts", "an integer"),
            ("completion_tokens", "an integer"),
            ("layers_edited", "a list of integers"),
            ("val_probe_accuracy", "an object mapping layers to numbers"),
            ("timing_s", "an object"),
            ("activation_store_bytes", "an integer"),
            ("editor_bytes", "an integer"),
        ):
            _field(where, d, key, kind)
        _field(where, d, "store_dtype", "a string", optional=True)
        ev = _field(where, d, "evaluation", "an object or null", optional=True)
        return cls(
            provenance=Provenance.from_json(d),
            model=d["model"],
            split_seed=d["split_seed"],
            questions=d["questions"],
            pairs=d["pairs"],
            texts=d["texts"],
            completion_tokens=d["completion_tokens"],
            store_dtype=d.get("store_dtype", "float16"),
            layers_edited=list(d["layers_edited"]),
            val_probe_accuracy={int(k): float(v) for k, v in d["val_probe_accuracy"].items()},
            timing_s=d["timing_s"],
            activation_store_bytes=d["activation_store_bytes"],
            editor_bytes=d["editor_bytes"],
            evaluation=None if ev is None else RunEvaluation.from_json(ev, where),
        )

    def save(self, out: str | os.PathLike) -> Path:
        """Write ``summary.json`` into the directory ``out`` (atomically)."""
        return write_json(Path(out) / "summary.json", self.to_json())


# --------------------------------------------------------------------------- eval


@dataclass
class EvalResult:
    """What :func:`~hpredit.evaluation.evaluate` returns: ``summary`` (as in ``summary.json``) and
    ``per_question`` rows (as in ``per_question.jsonl``). ``result["metrics"]`` reads the summary like a dict."""

    summary: dict
    per_question: list[dict] = field(default_factory=list)
    split: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    @property
    def metrics(self) -> dict:
        """``{"unedited": {...}, "edited": {...}, "difference": {name: {"mean", "ci", ...}}}``."""
        return self.summary["metrics"]

    @property
    def provenance(self) -> Provenance:
        return Provenance.from_json(self.summary)

    def to_dict(self) -> dict:
        return {"summary": self.summary, "per_question": self.per_question}

    def save(self, out: str | os.PathLike) -> Path:
        """Write ``summary.json``, ``per_question.jsonl`` and ``split.json`` to ``out`` atomically."""
        out = Path(out)
        with atomic_directory(out) as tmp:
            write_json(tmp / "summary.json", self.summary)
            lines = (json.dumps(row, ensure_ascii=False, default=to_jsonable) + "\n" for row in self.per_question)
            write_text_atomic(tmp / "per_question.jsonl", "".join(lines))
            write_json(tmp / "split.json", self.split)
            if self.summary.get("sweep"):
                sweep_figure(self.summary, tmp / "sweep.png")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EvalResult:
        """Read back what :meth:`save` wrote; a field of the wrong JSON type, or a row of
        ``per_question.jsonl`` that is not a JSON object, is one :class:`HpreditError` naming it."""
        directory = Path(directory)
        summary_path = directory / "summary.json"
        summary = read_json(summary_path, "evaluation summary")
        cls.check_summary(summary, str(summary_path))
        rows_path = directory / "per_question.jsonl"
        try:
            text = rows_path.read_text(encoding="utf-8") if rows_path.is_file() else ""
        except UnicodeDecodeError as e:
            raise HpreditError(f"{rows_path}: not UTF-8 text ({e})") from None
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise HpreditError(f"{rows_path}: line {n} is not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise HpreditError(f"{rows_path}: line {n} must be a JSON object, got {_json_type(row)}")
            rows.append(row)
        split_path = directory / "split.json"
        split = read_json(split_path, "split record") if split_path.exists() else {}
        return cls(summary, rows, split)

    @staticmethod
    def check_summary(d: dict[str, Any], where: str = "evaluation summary") -> None:
        """Refuse a ``summary.json`` field of the wrong JSON type (one error naming ``where`` and the field)."""
        _check_provenance(where, d)
        metrics = _field(where, d, "metrics", "an object")
        for key in metrics:
            _field(where, metrics, key, "an object", "metrics.")
        _field(where, d, "split", "an object")
        _field(where, d, "task", "a string", optional=True)
        _field(where, d, "headline", "a list of strings", optional=True)
        _field(where, d, "questions", "an integer", optional=True)
        _field(where, d, "model", "an object", optional=True)
        _field(where, d, "editor", "an object or null", optional=True)
        _field(where, d, "data", "an object or null", optional=True)
        _field(where, d, "timing_s", "an object", optional=True)
        for i, row in enumerate(_rows(where, d, "sweep", optional=True)):
            _field(where, row, "strength", "a number", f"sweep[{i}].")
            _field(where, row, "kl", "a number", f"sweep[{i}].")
            _field(where, row, "ppl", "a number", f"sweep[{i}].")
            _field(where, row, "ppl_unedited", "a number", f"sweep[{i}].", optional=True)
            _field(where, row, "metrics", "an object", f"sweep[{i}].")
            _field(where, row, "difference", "an object", f"sweep[{i}].")

    def table(self):
        """A rich table: each headline metric unedited, edited, difference and its CI."""
        m = self.metrics
        s = self.summary
        name = str(s["model"]["name"]).rstrip("/").rsplit("/", 1)[-1]
        title = f"{s['task']} · {name}"
        caption = f"split {s['split']['name']} (seed {s['split']['seed']}), {s['questions']} questions"
        if s.get("editor"):
            e = s["editor"]
            asked = f" (from KL {e['kl']:g})" if e.get("kl") is not None else ""
            at = "" if e.get("strength") is None else f", strength {e['strength']}{asked}"
            caption += f"; {e['method']} layers {e['layers']}{at}, scope {e['scope']}"
        names = [k for k in s.get("headline", m["unedited"]) if m["unedited"].get(k) is not None]
        names += [k for k in m["unedited"] if (k.startswith("judge_") or k == "truth_x_info") and k not in names]
        if s.get("sweep"):
            return self._sweep_table(title, caption, names)
        table = Table(title=title, caption=caption)
        table.add_column("metric")
        table.add_column("unedited", justify="right")
        if "edited" in m:
            table.add_column("edited", justify="right")
            table.add_column("edited − unedited", justify="right")
            ci = next(
                (m["difference"][n].get("confidence") for n in names if m["difference"].get(n, {}).get("confidence")),
                0.95,
            )
            table.add_column(f"{ci:.0%} CI (paired bootstrap)", justify="right")
        for name in names:
            row = [name, f"{m['unedited'][name]:.4f}"]
            if "edited" in m:
                d = m["difference"][name]
                ci_text = "–" if d.get("ci") is None else f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
                edited = m["edited"].get(name)
                row += [
                    "–" if edited is None else f"{edited:.4f}",
                    "–" if d.get("mean") is None else f"{d['mean']:+.4f}",
                    ci_text,
                ]
            table.add_row(*row)
        return table

    def _sweep_table(self, title: str, caption: str, names: list[str]):
        """A strength sweep: a row per strength (unedited first), each metric with its difference
        from unedited, and the fluency cost (KL nats/token and perplexity on neutral text, scope all)."""
        unedited = self.metrics["unedited"]
        table = Table(title=title, caption=caption + "; KL and perplexity on neutral text, scope all")
        for column in ("strength", *names, "KL", "ppl"):
            table.add_column(column, justify="right")

        def cell(value: float | None, diff: float | None = None) -> str:
            if value is None:
                return "–"
            return f"{value:.4f}" + ("" if diff is None else f" ({diff:+.4f})")

        rows = self.summary["sweep"]
        before = rows[0].get("ppl_unedited") if rows else None
        table.add_row("unedited", *(cell(unedited[n]) for n in names), "0", "" if before is None else f"{before:.2f}")
        for row in rows:
            d = row["difference"]
            values = (cell(row["metrics"].get(n), d.get(n, {}).get("mean")) for n in names)
            table.add_row(f"{row['strength']:g}", *values, f"{row['kl']:.4f}", f"{row['ppl']:.2f}")
        return table


def pyplot() -> Any:
    """``matplotlib.pyplot`` drawing off-screen (Agg), or None without matplotlib (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def sweep_figure(summary: dict, path: Path) -> bool:
    """A strength sweep's figure: the primary (first headline) metric against the strength, with the
    unedited value as a line, and the fluency cost (KL on neutral text) on a second axis. False
    without matplotlib (the ``plot`` extra)."""
    plt = pyplot()
    if plt is None:
        return False
    rows = summary["sweep"]
    key = (summary.get("headline") or list(summary["metrics"]["unedited"]))[0]
    strengths = [r["strength"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(strengths, [r["metrics"].get(key) for r in rows], "o-", color="C0", label=f"{key} (edited)")
    if summary["metrics"]["unedited"].get(key) is not None:
        ax.axhline(summary["metrics"]["unedited"][key], color="C0", linestyle=":", label=f"{key} unedited")
    ax.set_xlabel("strength")
    ax.set_ylabel(key, color="C0")
    kl_ax = ax.twinx()
    kl_ax.plot(strengths, [r["kl"] for r in rows], "s--", color="C1", label="KL (neutral text)")
    kl_ax.set_ylabel("KL nats/token on neutral text", color="C1")
    editor = summary.get("editor") or {}
    ax.set_title(f"{summary.get('task', '')}: {editor.get('method', 'editor')} strength sweep")
    lines = ax.get_legend_handles_labels()
    kl_lines = kl_ax.get_legend_handles_labels()
    ax.legend(lines[0] + kl_lines[0], lines[1] + kl_lines[1], loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- compare


@dataclass(frozen=True)
class CompareRow:
    """One row of a comparison's ``runs``: one method of one split seed at one chosen point.

    ``test`` (the task's metrics), ``test_items`` (each item's primary metric; None where the task
    has none) and the measurements after them are None (``norm_drift`` empty) where nothing was
    measured: a target no strength reached (``kl`` is then the largest cost reached). ``profile``:
    the edit profile on the test texts (None unedited). ``validation``: every setting the strength
    search measured. Matched-cost rows carry ``target``, ``status``, ``kl_miss`` (the relative miss
    of the measured KL) and ``val`` (the validation score that chose among candidates, if any);
    grid rows carry ``over_kl_cap``. :meth:`to_json` writes the keys of the row's protocol only.
    """

    seed: int
    method: str
    strength: float
    layers: list[int]
    heads: list[list[int]]
    test: dict | None
    test_items: list[float] | None
    kl: float | None
    ppl: float | None
    ppl_unedited: float | None
    norm_drift: dict
    profile: dict | None
    validation: list[dict]
    config: dict | None
    seconds: float
    target: float | None = None
    status: str | None = None
    kl_miss: float | None = None
    val: float | None = None
    over_kl_cap: bool | None = None

    def to_json(self) -> dict[str, Any]:
        d = {"seed": self.seed, "method": self.method}
        if self.status is not None:  # matched
            d.update(target=self.target, status=self.status)
            if self.target is not None:
                d["kl_miss"] = self.kl_miss
        d.update(
            strength=self.strength,
            layers=self.layers,
            heads=self.heads,
            test=self.test,
            test_items=self.test_items,
            kl=self.kl,
            ppl=self.ppl,
            ppl_unedited=self.ppl_unedited,
            norm_drift=self.norm_drift,
            profile=self.profile,
        )
        if self.status is not None:
            d["val"] = self.val
        if self.over_kl_cap is not None:  # grid
            d["over_kl_cap"] = self.over_kl_cap
        d.update(validation=self.validation, config=self.config, seconds=self.seconds)
        return d


@dataclass
class CompareResult:
    """What :func:`hpredit.compare.compare` returns and writes as ``results.json``.

    ``runs``: one row per (seed, method): strength, layers, test metrics, KL, perplexity, norm
    drift, the validation sweep. ``splits``: one row per seed: the groups of each split and how
    many val/test items they hold. ``summary``: per method, mean and std over seeds.
    ``setting`` holds everything else the file records (model, task, metrics, methods, seeds, the
    cap, …) under the file's own keys; ``result["key"]`` reads any top-level key of the file.
    """

    provenance: Provenance
    setting: dict[str, Any]
    runs: list[dict[str, Any]]
    splits: list[dict[str, Any]]
    summary: dict[str, Any]
    seconds: float

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    @property
    def metrics(self) -> list[str]:
        return list(self.setting.get("metrics", ["mc1", "mc2", "mc3"]))

    def to_json(self) -> dict[str, Any]:
        return {
            **self.provenance.to_json(),
            **self.setting,
            "runs": self.runs,
            "splits": self.splits,
            "summary": self.summary,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "result file") -> CompareResult:
        """From ``results.json`` (``where``: the file, named in errors); earlier files kept the
        split rows among ``runs``: they are separated here. A field of the wrong JSON type is one
        :class:`HpreditError` naming it."""
        _check_provenance(where, d)
        rows = _rows(where, d, "runs", optional=True)
        for i, row in enumerate(rows):
            _field(where, row, "method", "a string", f"runs[{i}].", optional=True)
        runs = [r for r in rows if "method" in r]
        splits = _rows(where, d, "splits", optional=True) + [r for r in rows if "method" not in r]
        summary = _field(where, d, "summary", "an object", optional=True)
        seconds = _field(where, d, "seconds", "a number", optional=True)
        for key, kind in (
            ("model", "an object"),
            ("task", "a string"),
            ("metrics", "a list of strings"),
            ("primary", "a string"),
            ("methods", "an object"),
            ("seeds", "a list of integers"),
        ):
            _field(where, d, key, kind, optional=True)
        setting = {k: v for k, v in _without_provenance(d).items() if k not in ("runs", "splits", "summary", "seconds")}
        return cls(
            Provenance.from_json(d),
            setting,
            runs,
            splits,
            {} if summary is None else summary,
            0.0 if seconds is None else seconds,
        )


# --------------------------------------------------------------------------- the reader


def load_result(path: str | os.PathLike) -> RunResult | EvalResult | CompareResult:
    """Read a result back: a directory written by ``run``, ``eval`` or ``compare``, or its main file.

    Files written by earlier versions load too (their provenance keys are mapped, compare's split
    rows separated from the method rows).
    """
    path = Path(path)
    if path.is_dir():
        for name in ("summary.json", "results.json"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise HpreditError(f"{path} holds no summary.json or results.json (not a run, eval or compare output)")
    d = read_json(path, "result file")
    if not isinstance(d, dict):
        raise HpreditError(f"{path}: a result file holds a JSON object")
    try:
        if "runs" in d and "summary" in d:
            return CompareResult.from_json(d, str(path))
        if "layers_edited" in d:
            return RunResult.from_json(d, str(path))
        if "metrics" in d and "split" in d:
            return EvalResult.load(path.parent)
    except (KeyError, TypeError, ValueError) as e:
        raise HpreditError(f"{path}: not a readable result file ({type(e).__name__}: {e})") from None
    raise HpreditError(f"{path}: not a run, eval or compare result")
