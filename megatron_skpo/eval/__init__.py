"""Benchmark evaluation (avg@k, pass@k) with vLLM generation and the math reward pool.

Public API: :func:`evaluate` / :func:`evaluate_benchmark` (:mod:`.runner`), :class:`EvalSettings`,
:func:`resolve_model` (HF dir or GGUF -> HF dir), :class:`VLLMGenerator`, :func:`pass_at_k`,
:func:`summarize`; the CLI is ``skpo-eval`` (:mod:`megatron_skpo.cli.eval`).
"""
from megatron_skpo.eval.engine import Completion, Generator, VLLMGenerator, configure_cpu_env
from megatron_skpo.eval.metrics import BenchmarkSummary, markdown_table, pass_at_k, summarize
from megatron_skpo.eval.model import resolve_model
from megatron_skpo.eval.runner import EvalSettings, evaluate, evaluate_benchmark, read_records

__all__ = [
    "BenchmarkSummary", "Completion", "EvalSettings", "Generator", "VLLMGenerator", "configure_cpu_env",
    "evaluate", "evaluate_benchmark", "markdown_table", "pass_at_k", "read_records", "resolve_model", "summarize",
]
