"""lm-evaluation-harness interop (optional extra `slimlm[lm-eval]`): run lm-eval's own `HFLM` and its own task
definitions on a slimlm model and on exactly the examples slimlm scores.

Each slimlm task maps to lm-eval's YAML for it; only the data source is swapped: the examples slimlm selected
(same rows, same seeded subset) are written as a jsonl in the hub's layout, and lm-eval reads that file through its
`json` dataset loader. Everything else (prompts, `process_docs`, scoring, metrics) is lm-eval's.

    from slimlm.evaluate.tasks.harness import run_lm_eval
    results = run_lm_eval("smollm2-135m", tasks=["piqa", "arc_easy"], limit=100)
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from slimlm.errors import SlimlmError
from slimlm.evaluate.tasks import DEFAULT_TASKS, TaskData, load_task_data, select

# slimlm task -> lm-eval's task YAML, relative to lm_eval/tasks/
LM_EVAL_YAML = {
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "lambada": "lambada/lambada_openai.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "winogrande": "winogrande/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml",
    "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
    "crows_pairs": "crows_pairs/crows_pairs_english.yaml",
}


@dataclass(frozen=True)
class LmEvalResult:
    task: str
    metrics: dict[str, float]  # lm-eval's names: acc, acc_norm, perplexity, pct_stereotype, ...
    stderr: dict[str, float | None]
    examples: int
    seconds: float  # time inside HFLM.loglikelihood (tokenizing and scoring), not data loading
    examples_per_s: float
    requests: list[list[tuple[str, str]]]  # per example, the (context, continuation) pairs lm-eval scored
    per_example: list[dict[str, float]]  # per example, lm-eval's metric values


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SlimlmError("lm-eval is not installed", "pip install 'slimlm[lm-eval]' (lm-eval 0.4.x)") from None


def lm_eval_task_config(task: str, rows_file: Path) -> dict:
    """lm-eval's config for `task`, reading its documents from `rows_file` (a jsonl in the hub's layout)."""
    _require_lm_eval()
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    if task not in LM_EVAL_YAML:
        raise SlimlmError(f"task '{task}' has no lm-eval counterpart here", f"known: {', '.join(LM_EVAL_YAML)}")
    config = load_yaml(Path(lm_eval.tasks.__file__).parent / LM_EVAL_YAML[task])  # resolves `include` and !function
    config.pop("tag", None)
    config.pop("group", None)
    config.update(
        task=f"slimlm_{task}",
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {"test": str(rows_file)}},
        training_split=None,
        validation_split=None,
        test_split="test",
        fewshot_split=None,
        num_fewshot=0,
    )
    return config


def _json_ready(row: dict) -> dict:
    return {str(key): value for key, value in row.items()}


def score_with_lm_eval(lm, data: TaskData, indices: list[int], workdir: Path) -> LmEvalResult:
    """Score `data.rows[indices]` with lm-eval (an `HFLM` made by `make_hflm`), its task definition for `data.task`."""
    from lm_eval import simple_evaluate

    rows_file = workdir / f"{data.task.name}.jsonl"
    rows_file.write_text("".join(json.dumps(_json_ready(data.rows[i][1])) + "\n" for i in indices))
    lm.loglikelihood_seconds = 0.0
    config = lm_eval_task_config(data.task.name, rows_file)
    output = simple_evaluate(
        model=lm,
        tasks=[config],
        task_manager=lm.task_manager,
        log_samples=True,
        bootstrap_iters=1000,
        verbosity="ERROR",
    )
    name = f"slimlm_{data.task.name}"
    raw = output["results"][name]
    metrics = {key.split(",")[0]: value for key, value in raw.items() if "," in key and "_stderr" not in key}
    stderr = {
        key.split("_stderr")[0]: (value if isinstance(value, float) else None)
        for key, value in raw.items()
        if "_stderr" in key
    }
    samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
    requests = [[tuple(arg) for arg in sample["arguments"]] for sample in samples]
    per_example = [{k: sample[k] for k in metrics if k in sample} for sample in samples]
    seconds = lm.loglikelihood_seconds
    return LmEvalResult(
        data.task.name,
        metrics,
        stderr,
        len(samples),
        seconds,
        len(samples) / seconds if seconds else float("inf"),
        requests,
        per_example,
    )


def make_hflm(model: nn.Module, tokenizer, batch_size: int | str = 16):
    """lm-eval's `HFLM` around an already-loaded model (slimlm-compressed or not), timing its log-likelihood calls."""
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    class TimedHFLM(HFLM):
        loglikelihood_seconds = 0.0

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            start = time.perf_counter()
            try:
                return super().loglikelihood(requests, disable_tqdm=True)
            finally:
                self.loglikelihood_seconds += time.perf_counter() - start

    device = next(model.parameters()).device
    lm = TimedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    lm.task_manager = TaskManager()  # indexing lm-eval's task YAMLs takes seconds: once per HFLM, not per task
    return lm


def run_lm_eval(
    model: str | nn.Module,
    tokenizer=None,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    limit: int | None = None,
    seed: int = 0,
    data_root: str | Path | None = None,
    batch_size: int | str = 16,
    device: str | None = None,
) -> list[LmEvalResult]:
    """Run lm-eval's HFLM on a slimlm model (a loaded module with its tokenizer, or anything `load_model` takes:
    alias, directory, .gguf) over the same examples `slimlm.evaluate.tasks.evaluate_tasks` would score."""
    _require_lm_eval()
    if isinstance(model, str):
        from slimlm.models.load import load_model

        loaded = load_model(model, device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
    elif tokenizer is None:
        raise SlimlmError(
            "a model object needs its tokenizer", "pass tokenizer=..., or pass the model's directory or alias instead"
        )
    loaded_data = [load_task_data(spec, data_root) for spec in tasks]
    lm = make_hflm(model, tokenizer, batch_size)
    with tempfile.TemporaryDirectory(prefix="slimlm-lm-eval-") as workdir:
        return [
            score_with_lm_eval(lm, data, select(len(data.rows), limit, seed), Path(workdir)) for data in loaded_data
        ]
