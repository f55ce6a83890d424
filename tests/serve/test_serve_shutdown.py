"""`kubetune serve` as a process: SIGTERM lets the in-flight request finish, then the process exits 0
at once, without the interpreter's teardown of torch (seconds on a busy box: the grace period)."""
import json
import signal
import socket
import subprocess
import sys
import time

import httpx


# `python -m kubetune`, plus an atexit hook that would leave a file if the interpreter's teardown ran.
LAUNCH = ("import atexit, pathlib, sys; atexit.register(pathlib.Path(sys.argv.pop(1)).touch); "
          "from kubetune.cli import main; sys.exit(main())")


def test_sigterm_drains_in_flight_requests_then_exits(tiny_dir, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    teardown_ran = tmp_path / "teardown-ran"
    server = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(teardown_ran), "serve", str(tiny_dir), "--served-model-name", "tiny",
         "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--allow-ignore-eos"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)

        body = {"model": "tiny", "prompt": "The model is", "max_tokens": 300, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            server.send_signal(signal.SIGTERM)  # mid-generation
            rest = [line for line in lines if line]
        events = [first, *rest]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 300  # the request finished in full despite the SIGTERM

        assert server.wait(timeout=60) == 0
        output = server.stdout.read()
        assert "Shutting down" in output or "shutting down" in output.lower()
        assert "Finished server process" in output  # the log was flushed before the fast exit
        assert not teardown_ran.exists(), "the interpreter's teardown ran after the drain (slow stop)"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
