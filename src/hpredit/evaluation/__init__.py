"""TruthfulQA evaluation: exact MC1/MC2/MC3 on cached prefixes, generation metrics, judges."""
