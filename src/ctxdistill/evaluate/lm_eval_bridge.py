"""Optional bridge to lm-evaluation-harness, for users who have its task data locally.

lm-eval is not a dependency: `run_lm_eval` imports it on demand and says how to install it when it
is missing. The in-memory model is wrapped in lm-eval's `HFLM` (no reload), tasks run through
`simple_evaluate` with the chat template applied and few-shot examples as turns (as the DiSC authors
ran it), and local task YAMLs can be added with `include_path`. Offline, lm-eval can only run tasks
whose datasets are already in the local Hugging Face cache or defined by local files.
"""

from __future__ import annotations

import math

from ..errors import CtxDistillError


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                batch_size: int = 8, apply_chat_template: bool = True, max_gen_toks: int | None = None) -> dict:
    if not lm_eval_available():
        raise CtxDistillError("--lm-eval-tasks needs lm-evaluation-harness; install it with `pip install lm-eval` "
                              "(optional, not a ctxdistill dependency) or drop --lm-eval-tasks")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task_manager = None
    if include_path:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    kwargs = {"gen_kwargs": f"max_gen_toks={max_gen_toks}"} if max_gen_toks else {}
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=task_manager,
                                          apply_chat_template=apply_chat_template, fewshot_as_multiturn=apply_chat_template,
                                          log_samples=False, **kwargs)
    except Exception as exc:  # lm-eval raises many kinds (missing datasets offline, bad task names)
        raise CtxDistillError(f"lm-eval failed on {', '.join(tasks)}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    metrics = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if not isinstance(value, (int, float)) or "_stderr" in key or key == "alias":
                continue
            metric, _, filt = key.partition(",")
            stderr = values.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            name = f"{task}.{metric}" + (f".{filt}" if filt and filt != "none" else "")
            metrics[name] = {"value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else math.nan,
                             "n": int(results.get("n-samples", {}).get(task, {}).get("effective", 0) or 0)}
    return {"metrics": metrics, "settings": {"tasks": tasks, "include_path": include_path, "limit": limit,
                                             "apply_chat_template": apply_chat_template, "fewshot_as_multiturn": apply_chat_template,
                                             "lm_eval_version": getattr(lm_eval, "__version__", "?"), "configs": {
                                                 t: {k: v for k, v in c.items() if k in ("num_fewshot", "generation_kwargs", "output_type")}
                                                 for t, c in results.get("configs", {}).items()}}}
