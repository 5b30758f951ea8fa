"""nanochat's online SFT sources, downloaded from the Hugging Face hub (needs internet).

| kind             | dataset (file at `resolve/main/`)                                   | rows     | licence    |
|------------------|----------------------------------------------------------------------|----------|------------|
| `smoltalk`       | HuggingFaceTB/smol-smoltalk `data/train-0000{0..3}-of-00004.parquet` | ~460 K   | Apache-2.0 |
| `mmlu_aux_train` | cais/mmlu `all/auxiliary_train-00000-of-00001.parquet`               | 99,842   | MIT        |
| `gsm8k_train`    | openai/gsm8k `main/train-00000-of-00001.parquet`                     | 7,473    | MIT        |

Files are fetched from `<hub>/datasets/<repo>/resolve/<revision>/<path>` (`--hub-url`, default
$HF_ENDPOINT or https://huggingface.co) with `chatlm.data.download.download_file`: into a `.part`
that an interrupted run resumes with a Range request, retried, and checked against the size and
sha256 that the hub announces for the file (`X-Linked-Size` / `X-Linked-Etag` of an unfollowed HEAD,
as huggingface_hub reads them) or at least its Content-Length. Then converted as nanochat's tasks do:

- smoltalk: the `messages` column as it is (a leading system message is allowed; the chat format
  folds it into the first user message); a row that does not render is skipped and counted.
- mmlu_aux_train: the chat evals' multiple-choice prompt (`mc_message`), the letter as the reply.
  (cais/mmlu's `auxiliary_train` config wraps each row in a `train` struct: unwrapped if present.)
- gsm8k_train: the question, then the solution as parts: each `<<expr=value>>` calculator note
  becomes a `python` part (expr) and a `python_output` part (value), the text around it `text`
  parts, ending `#### N`. `gsm8k_train_raw.jsonl` keeps `{id, question, answer, final}` for RL.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from chatlm.data.download import download_file, sha256_file
from chatlm.data.shards import DataError
from chatlm.evals.chat import LETTERS, final_number, mc_message

HUB_URL = "https://huggingface.co"
RETRIES = 5  # download attempts per file (tests lower these)
BACKOFF = 2.0
TIMEOUT = 60.0


@dataclass(frozen=True)
class HubFile:
    repo: str
    path: str
    revision: str = "main"

    def url(self, hub: str) -> str:
        return f"{hub.rstrip('/')}/datasets/{self.repo}/resolve/{self.revision}/{self.path}"

    def local(self, root: Path) -> Path:
        return root / self.repo / self.revision / self.path

    @property
    def label(self) -> str:
        return f"{self.repo}@{self.revision}/{self.path}"


SMOLTALK = tuple(HubFile("HuggingFaceTB/smol-smoltalk", f"data/train-{i:05d}-of-00004.parquet") for i in range(4))
MMLU_AUX = (HubFile("cais/mmlu", "all/auxiliary_train-00000-of-00001.parquet"),)
GSM8K_TRAIN = (HubFile("openai/gsm8k", "main/train-00000-of-00001.parquet"),)


def default_hub() -> str:
    return os.environ.get("HF_ENDPOINT") or HUB_URL


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def announced(url: str) -> tuple[Optional[int], Optional[str]]:
    """(size, sha256) the hub announces for a file: X-Linked-Size / X-Linked-Etag on the redirect
    of a large (LFS) file, else Content-Length; None where it says nothing."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "chatlm-fetch-sft"})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        response = opener.open(request, timeout=TIMEOUT)
        headers = response.headers
        response.close()
    except urllib.error.HTTPError as e:
        if e.code not in (301, 302, 303, 307, 308):
            raise DataError(f"download failed: {url} answered HTTP {e.code} {e.reason}") from None
        headers = e.headers
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"download failed: cannot reach {url} ({getattr(e, 'reason', e)}); check --hub-url") from None
    size = headers.get("X-Linked-Size") or (headers.get("Content-Length") if "Location" not in headers else None)
    etag = (headers.get("X-Linked-Etag") or "").strip().strip('"').removeprefix("W/").strip('"')
    return (int(size) if size and size.isdigit() else None), (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)


def fetch(files: tuple[HubFile, ...], root: Path, hub: str, allow: bool, say: Callable[[str], None]) -> list[dict]:
    """Every file under root (downloaded unless there already); provenance for READY.json."""
    out = []
    for f in files:
        path = f.local(root)
        url = f.url(hub)
        if not path.is_file():
            if not allow:
                raise DataError(f"no {path} (for {f.label}); drop --no-fetch to download it")
            size, sha = announced(url)
            part = path.with_name(path.name + ".part")
            resumed = f", resuming at {part.stat().st_size:,} bytes" if part.exists() else ""
            say(f"+ GET {url} ({f'{size:,} bytes' if size else 'size unannounced'}{resumed})")
            download_file(url, path, expected_size=size, sha256=sha, retries=RETRIES, backoff=BACKOFF, timeout=TIMEOUT)
        out.append({"file": f.label, "url": url, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return out


def rows(path: Path, columns: Optional[list[str]] = None) -> Iterator[dict]:
    """The rows of a parquet file, batch by batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        for batch in table.iter_batches(batch_size=2048, columns=columns):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e}); delete it and fetch it again") from e


def smoltalk(paths: list[Path], tally: Counter) -> Iterator[dict]:
    for path in paths:
        for i, row in enumerate(rows(path)):
            messages = row.get("messages")
            if not isinstance(messages, list):
                tally["no messages"] += 1
                continue
            yield {
                "id": f"smoltalk/{path.name}/{i}",
                "messages": [{"role": m.get("role"), "content": m.get("content")} for m in messages],
            }


def mmlu_aux(paths: list[Path], tally: Counter) -> Iterator[dict]:
    for path in paths:
        for i, row in enumerate(rows(path)):
            row = row.get("train", row) if isinstance(row.get("train"), dict) else row
            question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
            if (
                not isinstance(question, str)
                or not isinstance(choices, list)
                or not all(isinstance(c, str) for c in choices)
                or not isinstance(answer, int)
                or not 0 <= answer < len(choices) <= len(LETTERS)
            ):
                tally["malformed row"] += 1
                continue
            yield {
                "id": f"mmlu_aux_train/{i}",
                "messages": [
                    {"role": "user", "content": mc_message(question, choices)},
                    {"role": "assistant", "content": LETTERS[answer]},
                ],
            }


_CALC = re.compile(r"<<([^<>]*)>>")


def gsm8k_parts(answer: str) -> list[dict]:
    """A GSM8K solution as assistant parts: `<<expr=value>>` -> python(expr), python_output(value)."""
    parts: list[dict] = []
    last = 0
    for m in _CALC.finditer(answer):
        if m.start() > last:
            parts.append({"type": "text", "text": answer[last : m.start()]})
        expr, _, value = m.group(1).rpartition("=") if "=" in m.group(1) else (m.group(1), "", "")
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": value})
        last = m.end()
    if last < len(answer):
        parts.append({"type": "text", "text": answer[last:]})
    return parts


def gsm8k(paths: list[Path], tally: Counter, raw: Optional[list[dict]] = None) -> Iterator[dict]:
    """GSM8K conversations; raw (if given) collects {id, question, answer, final} per problem."""
    for path in paths:
        for i, row in enumerate(rows(path)):
            question, answer = row.get("question"), row.get("answer")
            final = final_number(answer) if isinstance(answer, str) else None
            if not isinstance(question, str) or not question.strip() or not isinstance(answer, str) or final is None:
                tally["no question or no '#### N' answer"] += 1
                continue
            if raw is not None:
                raw.append({"id": f"train/{i}", "question": question, "answer": answer, "final": final})
            yield {
                "id": f"gsm8k_train/{i}",
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": gsm8k_parts(answer)},
                ],
            }
