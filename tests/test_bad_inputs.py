"""The bad-input sweep (issue 14) as a table: each command line → exit status 2, one ``error:`` line
with the expected fragment, and nothing written (no output, no temporary sibling, inputs untouched).

Every case runs through the real entry point (``hpredit.cli.main``) on tiny random models saved to
a temporary directory; loading a model or collecting activations fails the test, since every case
must be refused before that. A new command or option gets its rows here. Below the table: the
output-as-a-whole cases (errors after the start, ``--force``, SIGINT and SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import hpredit
from hpredit.cli import main

from .conftest import TRUTHFULQA_CSV, random_hpr, saved_tiny_model, tiny_model

# --------------------------------------------------------------------------- the world the cases run in


def _pairs_jsonl(path: Path, n: int = 12) -> Path:
    rows = [
        {"prompt": f"Question {i}: is water wet?\nAnswer:", "positive": " Yes, it is.", "negative": f" No {i}."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer) -> dict[str, str]:
    """Paths the table's ``{placeholders}`` name: models, editors and bad files (never modified)."""
    import transformers as t

    root = tmp_path_factory.mktemp("world")
    model = saved_tiny_model(root / "model", tokenizer)
    random_hpr(model).save_pretrained(root / "editor")
    random_hpr(tiny_model("qwen2")).save_pretrained(root / "other-editor")
    (root / "empty-model").mkdir()
    (root / "no-config").mkdir()
    (root / "no-config" / "tokenizer.json").write_text("{}")
    t.T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=32, vocab_size=100).save_pretrained(root / "t5")
    t.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=100
    ).save_pretrained(root / "bert")
    (root / "truncated").mkdir()
    for f in (root / "model").iterdir():
        (root / "truncated" / f.name).write_bytes(f.read_bytes())
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "only-config").mkdir()
    (root / "only-config" / "config.json").write_bytes((root / "model" / "config.json").read_bytes())
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01\x02binary")
    (root / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "positive": "a", "negative": "b"}\n')
    (root / "nested.jsonl").write_text("[" * 200_000 + "\n")
    (root / "latin1.csv").write_bytes(
        b"Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\nA,B,Caf\xe9?,x,y,z,s\n"
    )
    (root / "pairs-dir").mkdir()
    (root / "a-file").write_text("not a directory")
    _pairs_jsonl(root / "pairs.jsonl")
    return {
        "model": str(root / "model"),
        "editor": str(root / "editor"),
        "other_editor": str(root / "other-editor"),
        "root": str(root),
        "csv": str(TRUTHFULQA_CSV),
        **{
            k.replace("-", "_"): str(root / k)
            for k in (
                "empty-model",
                "no-config",
                "t5",
                "bert",
                "truncated",
                "only-config",
                "binary.jsonl",
                "latin1.jsonl",
                "nested.jsonl",
                "latin1.csv",
                "pairs-dir",
                "a-file",
                "pairs.jsonl",
            )
        },
    }


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model or collecting activations fails the test: every case must be refused first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded (or activations collected) before the bad input was refused")

    # patched where each job looks the name up (each imports it from its defining module)
    for where in ("pipeline", "evaluation.job", "evaluation.judges", "compare.harness"):
        monkeypatch.setattr(f"hpredit.{where}.load_model", refuse)
    for where in ("pipeline", "compare.harness"):
        monkeypatch.setattr(f"hpredit.{where}.collect_activations", refuse)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  #: split on spaces after filling {placeholders}; "∅" stands for an empty argument
    fragment: str  #: must be in the one error line
    env: dict[str, str | None] = field(default_factory=dict)  #: None unsets the variable


CUDA = torch.cuda.is_available()
RUN = "run --model {model} --data {csv} --top-k 2 --out {out}"
FIT = "fit --model {model} --data {csv} --top-k 2 --out {out}"
GEN = "generate hello --model {model} --editor {editor}"
CMP = "compare --model {model} --data {csv} --methods none,hpr --out {out}"
EVAL = "eval --model {model} --data {csv} --out {out}"

CASES = [
    # -- tracebacks before: bad files, outputs, models, devices, numbers
    Case("pairs-binary", "fit --model {model} --pairs {binary.jsonl} --top-k 2 --out {out}", "not UTF-8"),
    Case("pairs-latin1", "fit --model {model} --pairs {latin1.jsonl} --top-k 2 --out {out}", "not UTF-8"),
    Case("pairs-nested", "fit --model {model} --pairs {nested.jsonl} --top-k 2 --out {out}", "nested too deeply"),
    Case("csv-latin1", "run --model {model} --data {latin1.csv} --top-k 2 --out {out}", "not UTF-8"),
    Case("out-is-a-file", "run --model {model} --data {csv} --top-k 2 --out {a_file}", "not a directory"),
    Case("out-unwritable", "run --model {model} --data {csv} --top-k 2 --out /proc/hpredit-out", "cannot write"),
    Case("fit-out-unwritable", "fit --model {model} --data {csv} --top-k 2 --out /proc/hpredit-out", "cannot write"),
    Case("eval-out-is-a-file", "eval --model {model} --data {csv} --out {a_file}", "not a directory"),
    Case("compare-out-unwritable", "compare --model {model} --data {csv} --out /proc/hpredit-out", "cannot write"),
    Case("model-missing", "run --model /nonexistent/model --data {csv} --out {out}", "no such directory"),
    Case("model-empty-dir", "run --model {empty_model} --data {csv} --out {out}", "empty"),
    Case("model-no-config", "run --model {no_config} --data {csv} --out {out}", "config.json"),
    Case("model-t5", "fit --model {t5} --data {csv} --out {out}", "encoder-decoder"),
    Case("model-bert-no-lm-head", "fit --model {bert} --data {csv} --out {out}", "causal"),
    Case("model-truncated", "run --model {truncated} --data {csv} --out {out}", "truncated"),
    Case("model-only-config", "run --model {only_config} --data {csv} --out {out}", "no weights"),
    *([] if CUDA else [Case("device-cuda", RUN + " --device cuda", "CUDA is not available")]),
    Case("device-cuda-7", RUN + " --device cuda:7", "cuda:7"),
    Case("device-banana", RUN + " --device banana", "unknown device 'banana'"),
    Case("generate-device-banana", GEN + " --device banana", "unknown device 'banana'"),
    Case("batch-size-0", RUN + " --batch-size 0", "--batch-size must be at least 1"),
    Case("batch-size-negative", FIT + " --batch-size -3", "--batch-size must be at least 1"),
    Case("eval-batch-size-0", EVAL + " --batch-size 0", "--batch-size must be at least 1"),
    Case("generate-empty-prompt", "generate ∅ --model {model} --editor {editor}", "prompt 1 is empty"),
    Case("generate-blank-prompt", "generate hi ∅ --model {model} --editor {editor}", "prompt 2 is empty"),
    Case("lm-eval-bad-pretrained", "lm-eval run --model hpredit --model_args pretrained=x --tasks t", "model 'x'"),
    Case(
        "lm-eval-missing-editor",
        "lm-eval run --model hpredit --model_args pretrained={model},editor=/nonexistent/ed --tasks t",
        "does not exist",
    ),
    # -- errors that used to come after fitting: refused before any work, so nothing is written
    Case("kl-cap-0", RUN + " --kl-cap 0", "--kl-cap must be a positive number"),
    Case("kl-cap-nan", RUN + " --kl-cap nan", "--kl-cap must be a positive number"),
    Case("strengths-abc", RUN + " --strengths abc", "--strengths must be comma-separated numbers"),
    Case("strengths-empty", RUN + " --strengths ,", "--strengths needs at least one value"),
    Case("strengths-huge", RUN + " --strengths 0.5,1e30", "each of --strengths must be a number between -100 and 100"),
    Case("max-halvings-negative", RUN + " --max-halvings -1", "--max-halvings must be at least 0"),
    # -- nonsense accepted silently before
    Case("layers-duplicate", FIT + " --layers 1,1", "more than once"),
    Case("layers-not-integers", FIT + " --layers 1.5,2", "comma-separated integers"),
    Case("top-k-too-many", RUN.replace("--top-k 2", "--top-k 100"), "--top-k 100 is more than the model's 3 layers"),
    Case("strength-1e30", GEN + " --strength 1e30", "--strength must be a number between -100 and 100"),
    Case("strength-inf", "eval --model {model} --data {csv} --editor {editor} --strength inf", "--strength must be"),
    Case("refine-negative", CMP + " --refine -1", "--refine must be at least 0"),
    Case("seeds-bad", CMP + " --seeds 0,x", "--seeds must be comma-separated integers"),
    Case("seeds-empty", CMP + " --seeds ,", "--seeds needs at least one value"),
    Case("methods-unknown", CMP.replace("none,hpr", "none,magic"), "unknown method(s) ['magic']"),
    Case("store-dtype-bad", RUN + " --store-dtype int8", "--store-dtype must be one of auto, float16"),
    Case("compare-store-dtype-bad", CMP + " --store-dtype half", "--store-dtype must be one of"),
    # -- unclear messages before
    Case("pairs-is-a-directory", "fit --model {model} --pairs {pairs_dir} --top-k 2 --out {out}", "is a directory"),
    Case("unknown-option", RUN + " --bogus", "No such option: --bogus"),
    Case("bad-number", RUN + " --epochs many", "Invalid value for '--epochs'"),
    Case("missing-out", "fit --model {model}", "Missing option '--out'"),
    Case("unknown-command", "fly", "No such command 'fly'"),
    # -- late checks: refused before the model loads
    Case("layers-99", FIT + " --layers 99", "--layers [99] out of range: the model has 3 layers"),
    Case("top-k-0", RUN.replace("--top-k 2", "--top-k 0"), "--top-k must be at least 1"),
    Case("epochs-0", RUN + " --epochs 0", "--epochs must be at least 1"),
    Case("limit-0", RUN + " --limit 0", "--limit must be positive, got 0"),
    Case("compare-limit-0", CMP + " --limit 0", "--limit must be positive, got 0"),
    Case(
        "generate-other-editor",
        "generate hello --model {model} --editor {other_editor}",
        "editor does not match this model: architecture",
    ),
    Case("generate-missing-editor", "generate hello --model {model} --editor /nonexistent/editor", "does not exist"),
    Case(
        "eval-other-editor",
        "eval --model {model} --data {csv} --editor {other_editor}",
        "editor does not match this model",
    ),
    Case("generate-max-new-tokens-0", GEN + " --max-new-tokens 0", "--max-new-tokens must be at least 1"),
    Case("generate-bad-scope", GEN + " --scope everywhere", "unknown scope 'everywhere'"),
    # -- data sources, before the model loads (offline: the tests' HF_HUB_OFFLINE=1)
    Case(
        "run-offline-no-truthfulqa",
        "run --model {model} --top-k 2 --out {out}",
        "no TruthfulQA data: pass the CSV",
        env={"HPREDIT_TRUTHFULQA": None},
    ),
    Case(
        "fit-offline-no-truthfulqa",
        "fit --model {model} --top-k 2 --out {out}",
        "--data",
        env={"HPREDIT_TRUTHFULQA": None},
    ),
    Case(
        "eval-offline-no-truthfulqa",
        "eval --model {model} --out {out}",
        "no TruthfulQA data",
        env={"HPREDIT_TRUTHFULQA": None},
    ),
    Case(
        "compare-offline-no-truthfulqa",
        "compare --model {model} --methods none --out {out}",
        "no TruthfulQA data",
        env={"HPREDIT_TRUTHFULQA": None},
    ),
    Case(
        "truthfulqa-env-missing",
        "run --model {model} --top-k 2 --out {out}",
        "does not exist",
        env={"HPREDIT_TRUTHFULQA": "/nonexistent/TruthfulQA.csv"},
    ),
    Case(
        "bbq-data-missing",
        "compare --model {model} --task bbq --data /nonexistent/bbq.jsonl --out {out}",
        "/nonexistent/bbq.jsonl",
    ),
    Case("toxigen-data-missing", "eval --model {model} --task toxigen --data /nonexistent/t.jsonl", "/nonexistent/t"),
    Case("refusal-not-utf8", "eval --model {model} --task refusal --data {latin1.csv}", "not UTF-8"),
    Case(
        "ab-data-missing",
        "compare --model {model} --task ab:sycophancy --data /nonexistent/ab.json --out {out}",
        "/nonexistent/ab.json",
    ),
    Case(
        "bbq-env-missing",
        "eval --model {model} --task bbq",
        "/nonexistent/bbq.jsonl",
        env={"HPREDIT_BBQ": "/nonexistent/bbq.jsonl"},
    ),
    Case("unknown-task-eval", "eval --model {model} --task ab:greed", "unknown task 'ab:greed'"),
    Case("unknown-task-compare", "compare --model {model} --task ab:greed --out {out}", "unknown task 'ab:greed'"),
]


def _fill(template: str, world: dict[str, str], out: Path) -> list[str]:
    values = {"out": str(out), **{k: v for k, v in world.items()}}
    parts = []
    for word in template.split(" "):
        for key, value in values.items():
            word = word.replace("{" + key + "}", value)
        parts.append("" if word == "∅" else word)
    return parts


def one_error_line(code, err: str, fragment: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_writes_nothing(case, world, tmp_path, capsys, monkeypatch, no_model_loads):
    for key, value in case.env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    before = _snapshot(Path(world["root"]))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(_fill(case.argv, world, out))
    _, err = capsys.readouterr()
    one_error_line(exc.value.code, err, case.fragment)
    assert list(tmp_path.iterdir()) == [], "something was written"
    assert _snapshot(Path(world["root"])) == before, "an input was modified"
    assert not Path("/proc/hpredit-out").exists()


def test_table_covers_every_command():
    commands = {c.argv.split(" ")[0] for c in CASES}
    assert {"fit", "run", "generate", "eval", "compare", "lm-eval"} <= commands


# --------------------------------------------------------------------------- outputs whole or not at all


def _cli(argv: list[str], capsys) -> tuple[int | None, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_fit_force_replaces_a_previous_run_whole_and_cleans_stale_temporaries(world, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for stale in ("summary.json", "split.json"):
        (out / stale).write_text("{}")
    (out / "editor").mkdir()
    (out / "editor" / "old.bin").write_text("old")
    (tmp_path / ".run.tmp-abc123").mkdir()  # what an interrupted earlier write left
    (tmp_path / ".run.tmp-abc123" / "partial").write_text("x")
    argv = f"fit --model {world['model']} --pairs {world['pairs.jsonl']} --top-k 1 --epochs 1 --out {out}".split()
    code, _, err = _cli(argv, capsys)
    one_error_line(code, err, "--force")
    assert (out / "summary.json").exists()  # refused: untouched
    code, _, err = _cli([*argv, "--force"], capsys)
    assert code in (0, None), err
    assert sorted(p.name for p in out.iterdir()) == ["editor"]
    assert not (out / "editor" / "old.bin").exists()
    assert hpredit.load_editor(out / "editor").layers
    assert _leftovers(tmp_path) == []


def test_run_writes_whole_output_with_provenance_and_halves_the_grid(world, tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, err = _cli(
        [
            "run",
            "--model",
            world["model"],
            "--data",
            world["csv"],
            "--limit",
            "3",
            "--epochs",
            "1",
            "--top-k",
            "2",
            "--store-dtype",
            "float32",
            "--kl-cap",
            "1e-12",
            "--strengths",
            "0.5,1.0",
            "--max-halvings",
            "2",
            "--protocol",
            "grid",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code in (0, None), err
    # the results path printed is --out, never the temporary directory that is gone when the run ends
    assert ".tmp-" not in "".join(printed.split()) and "results written to" not in printed, printed
    assert sorted(p.name for p in out.iterdir()) == ["activations", "editor", "eval", "split.json", "summary.json"]
    assert _leftovers(tmp_path) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["store_dtype"] == "float32"
    assert {"cpu", "torch_threads", "platform"} <= set(summary["machine"])
    assert {"hpredit", "torch", "transformers", "python"} <= set(summary["versions"])
    assert summary["command"].startswith("hpredit run ")
    sweep = summary["evaluation"]["validation_sweep"]
    # every strength is over a cap of 1e-12 nats: the grid is halved twice below its smallest value
    assert [t["strength"] for t in sweep] == [0.5, 1.0, 0.25, 0.125]
    assert summary["evaluation"]["over_kl_cap"] and summary["evaluation"]["strength"] in (0.5, 1.0, 0.25, 0.125)
    assert "strength on val" in err, err[-3000:]  # the progress bar says what it does
    meta = json.loads((out / "activations" / "meta.json").read_text())
    assert "float32" in json.dumps(meta)


def _spawn(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-c", "from hpredit.cli import main; main()", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_run_leaves_nothing(sig, code, word, world, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(
        ["run", "--model", world["model"], "--data", world["csv"], "--epochs", "50", "--top-k", "2", "--out", str(out)]
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not _leftovers(tmp_path):
            time.sleep(0.05)
        assert _leftovers(tmp_path), "the run never started writing"
        time.sleep(0.5)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == word
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "a temporary directory or a partial output was left"


def test_default_store_dtype_handles_a_model_beyond_float16(tokenizer, world, tmp_path, capsys):
    """A model whose block outputs exceed float16's range: fit's default (--store-dtype auto) works,
    --store-dtype float16 is one clear error (nothing written), float32 works too."""
    model = tiny_model("llama", vocab=len(tokenizer))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e6)
    loud = tmp_path / "loud"
    model.save_pretrained(loud)
    tokenizer.save_pretrained(loud)
    base = [
        "fit",
        "--model",
        str(loud),
        "--pairs",
        world["pairs.jsonl"],
        "--top-k",
        "1",
        "--epochs",
        "1",
        "--save-activations",
    ]
    code, _, err = _cli([*base, "--out", str(tmp_path / "f16"), "--store-dtype", "float16"], capsys)
    one_error_line(code, err, "float16")
    assert not (tmp_path / "f16").exists() and _leftovers(tmp_path) == []
    for store_dtype, expected in (("auto", "bfloat16"), ("float32", "float32")):
        out = tmp_path / store_dtype
        code, _, err = _cli([*base, "--out", str(out), "--store-dtype", store_dtype], capsys)
        assert code in (0, None), err
        store = hpredit.ActivationStore.load(out / "activations")
        assert expected in str(store.acts.dtype) and torch.isfinite(store.acts.float()).all()
        editor = hpredit.load_editor(out / "editor")
        with editor.attach(model, strength=1.0, strict=False):  # the same model, loaded under another name
            assert torch.isfinite(model(input_ids=torch.tensor([[5, 9, 200]])).logits).all()
