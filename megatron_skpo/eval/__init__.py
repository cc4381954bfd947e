"""Benchmark evaluation (avg@k, pass@k) with vLLM generation and the reward pool.

Public API: :func:`evaluate` (built-in recipes) / :func:`evaluate_tasks` (one :class:`Task` per
benchmark: its data, settings and reward kind) / :func:`evaluate_benchmark` (:mod:`.runner`);
the paper's suite: :func:`resolve_suite`, :func:`paper_table` (:mod:`.suite`); :class:`EvalSettings`,
:func:`resolve_model` (HF dir or GGUF -> HF dir), :class:`VLLMGenerator`, :func:`pass_at_k`,
:func:`summarize`; the CLI is ``skpo-eval`` (:mod:`megatron_skpo.cli.eval`).
"""
from megatron_skpo.eval.engine import Completion, Generator, VLLMGenerator, configure_cpu_env
from megatron_skpo.eval.metrics import BenchmarkSummary, markdown_table, pass_at_k, summarize
from megatron_skpo.eval.model import resolve_model
from megatron_skpo.eval.runner import EvalSettings, Task, evaluate, evaluate_benchmark, evaluate_tasks, read_records
from megatron_skpo.eval.suite import PAPER, SUITES, MissingData, SuiteBenchmark, paper_table, resolve_suite

__all__ = [
    "BenchmarkSummary", "Completion", "EvalSettings", "Generator", "MissingData", "PAPER", "SUITES", "SuiteBenchmark",
    "Task", "VLLMGenerator", "configure_cpu_env", "evaluate", "evaluate_benchmark", "evaluate_tasks",
    "markdown_table", "paper_table", "pass_at_k", "read_records", "resolve_model", "resolve_suite", "summarize",
]
