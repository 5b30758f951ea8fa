"""`python -m chatlm.serve` as a stage: its run directory (run.json names the served checkpoint,
requests.jsonl logs each request), the URL it prints, a clean stop on Ctrl-C recorded as
completed, and bad configs or checkpoints refused in one line."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import yaml

from chatlm.errors import ConfigError
from chatlm.hydra.app import to_typed
from tests.server.conftest import launch, stop


def test_the_run_directory_names_the_served_checkpoint(served):
    assert served.url.startswith("http://127.0.0.1:") and not served.url.endswith(":0")
    record = json.loads((served.run_dir / "run.json").read_text())
    assert record["stage"] == "serve" and record["status"] == "running"
    s = record["served"]
    assert s["checkpoint"] == str(served.run / "checkpoints" / "step_000005") and s["step"] == 5
    assert s["run_dir"] == str(served.run) and s["model_name"] == "smoke-step5" and s["url"] == served.url
    assert s["tokenizer"]["name"] == "bpe8k" and s["context"] == 128 and s["max_batch"] == 32
    cfg = yaml.safe_load((served.run_dir / "config.resolved.yaml").read_text())
    assert cfg["ckpt"] == str(served.run) and cfg["derived"]["model_name"] == "smoke-step5"

    r = httpx.post(served.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    line = json.loads((served.run_dir / "requests.jsonl").read_text().splitlines()[-1])
    assert line["id"] == r.json()["id"] and line["endpoint"] == "text" and line["status"] == 200
    assert line["completion_tokens"] == r.json()["usage"]["completion_tokens"] and line["ttft_s"] > 0
    assert "Once" not in json.dumps(line)  # the log holds no prompt text


def test_health_and_page(served):
    health = httpx.get(served.url + "/health").json()
    assert health == {"status": "ok", "model": "smoke-step5", "running": 0, "waiting": 0, "max_batch": 32}
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and "<title>chatlm</title>" in page.text
    js = httpx.get(served.url + "/static/app.js")
    assert js.status_code == 200 and "innerHTML" not in js.text and "textContent" in js.text


def test_ctrl_c_stops_cleanly_and_records_completed(smoke_train_run, tmp_path):
    run, env, _ = smoke_train_run
    env = dict(env, CHATLM_OUTPUT_ROOT=str(tmp_path / "outputs"))
    s = launch(run, env, tmp_path, "model_name=tiny-chat", "run_name=mine")
    r = httpx.post(
        s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    )
    assert r.status_code == 200 and r.json()["model"] == "tiny-chat"
    assert stop(s, signal.SIGINT) == 0
    output = "".join(s.lines)
    assert "Traceback" not in output and s.run_dir.name.endswith("_mine")
    record = json.loads((s.run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["served"]["model_name"] == "tiny-chat"
    m = record["final_metrics"]
    assert m["requests"] == 1 and m["generation_tokens"] == r.json()["usage"]["completion_tokens"]
    assert (tmp_path / "outputs" / "serve" / "latest").resolve() == s.run_dir.resolve()
    (line,) = (s.run_dir / "requests.jsonl").read_text().splitlines()
    assert json.loads(line)["status"] == 200


def _serve(args, env, cwd):
    return subprocess.run(
        [sys.executable, "-m", "chatlm.serve", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_bad_checkpoint_and_busy_port_are_one_line(smoke_train_run, tmp_path):
    run, env, _ = smoke_train_run
    env = dict(env, CHATLM_OUTPUT_ROOT=str(tmp_path / "outputs"))
    r = _serve(["ckpt=/no/such/run"], env, tmp_path)
    assert r.returncode != 0 and "no checkpoint at /no/such/run" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = _serve([f"ckpt={run}", f"port={port}"], env, tmp_path)
    assert r.returncode == 2 and f"port: cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2


@pytest.mark.parametrize(
    "override,key",
    [
        ("max_batch=0", "max_batch"),
        ("port=70000", "port"),
        ("max_tokens=5000", "max_tokens"),
        ("temperature=-1", "temperature"),
        ("top_p=0", "top_p"),
        ("max_queue=-1", "max_queue"),
        ("hardware=cpu2", "hardware.nproc_per_node"),
    ],
)
def test_bad_values_name_the_key(compose, override, key):
    with pytest.raises(ConfigError) as e:
        to_typed(compose("serve", ["ckpt=x", override]))
    assert e.value.key == key and str(e.value).startswith(key + ":")


def test_ckpt_is_required_and_defaults_compose(compose):
    with pytest.raises(ConfigError) as e:
        to_typed(compose("serve", []))
    assert e.value.key == "ckpt"
    cfg = to_typed(compose("serve", ["ckpt=x"]))
    assert (cfg.host, cfg.port, cfg.max_batch, cfg.max_tokens_cap) == ("127.0.0.1", 8000, 32, 4096)
    assert (cfg.temperature, cfg.top_k, cfg.max_tokens) == (0.8, 50, 512)  # nanochat's server defaults
    assert not hasattr(cfg, "optim") and not hasattr(cfg, "data")
