"""`python -m chatlm.serve ckpt=<run dir | checkpoint>`: an OpenAI-compatible API and a web chat page
for a checkpoint (body: chatlm.server.serving; docs/serving.md)."""

from __future__ import annotations

from chatlm.hydra.app import run_stage


def serve(cfg, run):
    from chatlm.errors import ChatlmError

    try:
        from chatlm.server.serving import serve as body
    except ImportError as e:  # the serve extra is missing
        raise ChatlmError(f"serving needs the serve extra ({e.name} is missing): pip install 'chatlm[serve]'") from None
    return body(cfg, run)


def main() -> None:
    run_stage("serve", serve)


if __name__ == "__main__":
    main()
