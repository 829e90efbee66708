"""Model cards: a Hub-format README.md in every saved model, evaluation results added by `ctxdistill eval`.

The card is what the Hub renders (huggingface_hub `ModelCard`: YAML front matter, then Markdown):
- front matter: `base_model` (the Hub id, when the base model has one), `library_name` (`transformers`,
  or `peft` for an adapter), `tags` (`ctxdistill`, the method, `lora` ...), `license` (the base model's,
  where known: the bundled alias, or the `license` in the base model's own card when it is on disk);
- the method, its hyper-parameters (its config section and the shared optimiser options), the corpus
  (documents, characters, sha256), the command that produced it (the `ctxdistill train ...` command
  line when run from the CLI, else the equivalent one), the ctxdistill version, the run's counts;
- after `ctxdistill eval` on that directory: a table of every metric with its 95 % interval
  (value ± 1.96 SE, n), between markers, replaced on each evaluation.

`--push-to-hub OWNER/NAME` uploads OUT/model (card included) at the end of training; with
HF_HUB_OFFLINE set it is refused in one line before training starts.
"""

from __future__ import annotations

import hashlib
import math
import os
import shlex
from pathlib import Path

from .errors import CtxDistillError

EVAL_START, EVAL_END = "<!-- ctxdistill:eval:start -->", "<!-- ctxdistill:eval:end -->"
KNOWN_BASES = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
OPTIMISER = ("lr", "lr_scheduler", "warmup_steps", "warmup_ratio", "epochs", "max_steps", "docs_per_step", "loss_normalization",
             "weight_decay", "beta1", "beta2", "eps", "grad_clip", "seed", "precision", "max_length", "student")
LORA = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
_COMMAND: list[str] | None = None


def set_command_line(argv: list[str] | None) -> None:
    """The CLI records the command it runs (and clears it after), so the card can show it verbatim."""
    global _COMMAND
    _COMMAND = list(argv) if argv else None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


def check_push(repo: str) -> None:
    if repo and hub_offline():
        raise CtxDistillError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or drop --push-to-hub "
                              f"and upload OUT/model later (huggingface-cli upload {repo} OUT/model)")


def front_matter_of(path: Path) -> dict:
    """The YAML front matter of a README.md on disk ({} when absent or unreadable)."""
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path).data.to_dict()
    except Exception:  # a malformed card of someone else's model must not fail our save
        return {}


def base_model_info(name: str) -> tuple[str | None, str | None]:
    """(Hub id, license) of the model trained from, where known; never touches the network."""
    if name in KNOWN_BASES:
        return KNOWN_BASES[name]
    path = Path(name).expanduser()
    if path.exists():
        meta = front_matter_of(path / "README.md" if path.is_dir() else path.parent / "README.md")
        base = meta.get("base_model") if "ctxdistill" in (meta.get("tags") or []) else None  # a ctxdistill model: keep the lineage
        return (base if isinstance(base, str) else None), meta.get("license")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "README.md")
    except Exception:
        cached = None
    meta = front_matter_of(Path(cached)) if isinstance(cached, str) else {}
    return name, meta.get("license")


def corpus_info(spec: str, documents) -> dict:
    digest, characters = hashlib.sha256(), 0
    for doc in documents:  # documents ({id, text}) or a method's structured records
        text = f"{doc.id}\x00{doc.text}" if hasattr(doc, "id") and hasattr(doc, "text") else repr(doc)
        characters += len(getattr(doc, "text", text))
        digest.update(f"{text}\x01".encode("utf-8", "surrogatepass"))
    info = {"spec": spec, "documents": len(documents), "characters": characters, "sha256_documents": digest.hexdigest()}
    path = Path(spec).expanduser()
    if path.is_file():
        from .files import sha256_of

        info["sha256_file"] = sha256_of(path)
    return info


def hyperparameters(cfg) -> dict:
    """The method's config section (replay: and its base method's), the shared optimiser options, LoRA's."""
    flat, sections = cfg.flat(), type(cfg).sections()
    out = {name: flat[name] for name in OPTIMISER}
    if cfg.student == "lora":
        out |= {name: flat[name] for name in LORA}
    methods = [cfg.method] + ([cfg.replay.replay_method] if cfg.method == "replay" else [])
    for method in methods:
        if method in sections:
            out |= {k: v for k, v in vars(getattr(cfg, method)).items()}
    return out


def command_line(cfg) -> str:
    if _COMMAND:
        return shlex.join(_COMMAND)
    defaults = type(cfg)().flat()
    changed = [(k, v) for k, v in cfg.flat().items() if v != defaults.get(k) and k not in ("overwrite",)]
    parts = ["ctxdistill", "train"]
    for key, value in changed:
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [f"--no-{key.replace('_', '-')}"] if value is False else [flag, str(value)]
    return shlex.join(parts) + "  # equivalent of the Python API call"


def method_summary(name: str) -> str:
    from .methods import REGISTRY

    cls = REGISTRY[name]
    doc = (cls.__doc__ or "").strip() or (__import__(cls.__module__, fromlist=["x"]).__doc__ or "").strip()
    return doc.split("\n\n")[0].replace("\n", " ")


def build_card(cfg, summary: dict, corpus: dict, kind: str) -> str:
    """The README.md text of a saved model; `kind` is model (full weights), adapter (PEFT) or merged."""
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    base, license_ = base_model_info(cfg.model)
    tags = ["ctxdistill", cfg.method, "knowledge-update"] + (["lora"] if cfg.student == "lora" else [])
    if kind == "adapter":
        tags.append("peft")
    data = ModelCardData(base_model=base, library_name="peft" if kind == "adapter" else "transformers", tags=tags, license=license_)
    counts = summary.get("counts", {})
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in hyperparameters(cfg).items())
    what = {"adapter": "A LoRA adapter (PEFT) for the base model", "merged": "A LoRA adapter merged into the base model",
            "model": "A fully fine-tuned model"}[kind]
    lines = [
        f"# {Path(cfg.out).name if cfg.out else 'ctxdistill model'}", "",
        f"{what}, trained with [ctxdistill](https://pypi.org/project/ctxdistill/) {__version__} by method `{cfg.method}` "
        f"from `{cfg.model}`" + (f" (`{base}`)" if base and base != cfg.model else "") + ".", "",
        f"**Method.** {method_summary(cfg.method)}", "",
        "## Training", "",
        f"- corpus: `{corpus['spec']}`, {corpus['documents']} documents, {corpus['characters']} characters; sha256 of the documents "
        f"`{corpus['sha256_documents']}`" + (f", of the file `{corpus['sha256_file']}`" if "sha256_file" in corpus else ""),
        f"- {counts.get('optimizer_steps', 0)} optimizer steps, {counts.get('documents', 0)} documents, "
        f"{counts.get('student_tokens', 0)} distilled tokens",
    ]
    stopped = summary.get("stopped_at_drift")
    if stopped:
        lines.append(f"- stopped by the forgetting budget: {stopped['reason']}")
    if summary.get("evaluations"):
        last = summary["evaluations"][-1]
        lines.append(f"- last check during training (step {last['step']}): chat drift KL {last['chat_kl']:.4f} nats/token")
    lines += ["", "Command:", "", "```bash", command_line(cfg), "```", "",
              "Hyper-parameters (the method's own and the shared optimiser options):", "",
              "| option | value |", "|---|---|", rows, "", EVAL_START,
              "No evaluation yet: run `ctxdistill eval --model THIS_DIRECTORY` to add retention and knowledge results here.", EVAL_END, ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)).content


def write_cards(cfg, summary: dict, corpus: dict) -> list[str]:
    """A README.md in every saved model directory (`summary["saved"]`)."""
    from .files import write_text_atomic

    written = []
    for name, directory in summary.get("saved", {}).items():
        kind = "merged" if name == "merged" else ("adapter" if cfg.student == "lora" else "model")
        path = Path(directory) / "README.md"
        write_text_atomic(path, build_card(cfg, summary, corpus, kind))
        written.append(str(path))
    return written


def evaluation_table(report: dict) -> str:
    lines = [f"Evaluated with `ctxdistill eval` (suite `{report.get('suite')}`" +
             (f", reference `{report['reference']}`" if report.get("reference") else "") + "); 95 % interval = value ± 1.96 SE.", "",
             "| metric | value | 95 % interval | n |", "|---|---|---|---|"]
    for key, m in report.get("metrics", {}).items():
        value, se = m.get("value", float("nan")), m.get("stderr", float("nan"))
        interval = f"[{value - 1.96 * se:.4f}, {value + 1.96 * se:.4f}]" if math.isfinite(se) else "-"
        lines.append(f"| `{key}` | {value:.4f} | {interval} | {m.get('n', '')} |")
    return "\n".join(lines)


def add_evaluation(model: str, report: dict) -> bool:
    """Put the evaluation table into the card of a ctxdistill model directory (False: no such card)."""
    from .files import write_text_atomic

    path = Path(model).expanduser() / "README.md"
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    if EVAL_START not in text or EVAL_END not in text:
        return False
    head, rest = text.split(EVAL_START, 1)
    tail = rest.split(EVAL_END, 1)[1]
    write_text_atomic(path, f"{head}{EVAL_START}\n{evaluation_table(report)}\n{EVAL_END}{tail}")
    return True


def push_to_hub(model_dir: str, repo: str, log=print) -> str:
    """Upload a saved model directory (its card included) to `repo`; one line on failure."""
    check_push(repo)
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        info = api.upload_folder(folder_path=model_dir, repo_id=repo, commit_message="ctxdistill train")
    except Exception as exc:
        raise CtxDistillError(f"--push-to-hub {repo}: upload failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                              f"the model is saved in {model_dir}") from None
    log(f"pushed {model_dir} to https://huggingface.co/{repo}")
    return str(getattr(info, "commit_url", repo))
