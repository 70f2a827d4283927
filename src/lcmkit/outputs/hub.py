"""Upload a finished distill folder to the hub. Uses huggingface_hub with the user's own login or HF_TOKEN;
we never read, print or write the token."""

from __future__ import annotations

from pathlib import Path

from lcmkit.errors import ConfigError
from lcmkit.outputs.card import CARD, LORA_FILE, RUN_RECORD, write_model_card


class PushError(RuntimeError):
    """An upload failed; the message is one line naming the repo, the cause and what to do."""


def upload_plan(out: Path) -> dict[str, Path]:
    """path in the repo -> local file: the card, the run record, the final weights (a full LCM's pipeline at
    the repo's top, so `from_pretrained(repo)` loads it), kohya exports and validation grids. Never
    checkpoints, caches, locks, logs or the online student."""
    out = Path(out)
    plan = {name: out / name for name in (CARD, RUN_RECORD, LORA_FILE) if (out / name).is_file()}
    plan.update({p.name: p for p in out.glob("*_kohya.safetensors")})
    plan.update({f"validation/{p.name}": p for p in sorted((out / "validation").glob("*.png"))})
    pipeline = out / "pipeline"
    if pipeline.is_dir():
        plan.update({str(p.relative_to(pipeline)): p for p in sorted(pipeline.rglob("*")) if p.is_file()})
    return plan


def push(out: Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the repo (exist_ok) and upload the outputs of `out` in one commit. Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    out = Path(out)
    if not out.is_dir():
        raise ConfigError(f"{out} is not a folder")
    write_model_card(out, repo_id)  # the card's snippet names the repo
    plan = upload_plan(out)
    if LORA_FILE not in plan and "model_index.json" not in plan:
        raise ConfigError(f"{out} holds no final weights ({LORA_FILE} or pipeline/): nothing to push")
    api = HfApi(token=token)
    retry = f"then retry with: lcmkit push {out} --repo-id {repo_id}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.create_commit(
            repo_id=repo_id, commit_message="Upload LCM made with lcmkit",
            operations=[CommitOperationAdd(path_in_repo=k, path_or_fileobj=str(v)) for k, v in plan.items()],
        )  # fmt: skip
    except Exception as e:
        raise PushError(f"push to {repo_id} failed: {_reason(e)}; {retry}") from None
    return str(getattr(commit, "commit_url", commit))


def _reason(e: Exception) -> str:
    """One line, with advice for the usual causes; never the token (huggingface_hub does not put it there)."""
    from huggingface_hub import errors

    name = type(e).__name__
    text = (str(e).strip().splitlines() or [name])[0][:200]
    if isinstance(e, errors.OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1): unset it on a machine with network"
    if isinstance(e, errors.LocalTokenNotFoundError):
        return "not logged in: run `hf auth login` or set HF_TOKEN"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return f"the hub refused the token ({status}): log in with a token that can write to this repo"
    if isinstance(e, OSError | ConnectionError) or "connect" in text.lower():
        return f"no connection to the hub ({name}: {text})"
    return f"{name}: {text}"
