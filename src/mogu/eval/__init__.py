"""Evaluation: judges (and, later, benchmarks, defenses and reports)."""

from .judges import JUDGES, KeywordJudge, get_judge, is_refusal

__all__ = ["JUDGES", "KeywordJudge", "get_judge", "is_refusal"]
