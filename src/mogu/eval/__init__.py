"""Evaluation: benchmark, judge and defense registries, the `mogu eval` runner and its report."""

from mogu.eval.benchmarks import BENCHMARKS, EvalPrompt, list_benchmarks, load_benchmark
from mogu.eval.defenses import DEFENSES, build_defense
from mogu.eval.judges import JUDGES, KeywordJudge, get_judge, is_refusal

__all__ = ["BENCHMARKS", "DEFENSES", "JUDGES", "EvalPrompt", "KeywordJudge", "build_defense", "get_judge",
           "is_refusal", "list_benchmarks", "load_benchmark"]
