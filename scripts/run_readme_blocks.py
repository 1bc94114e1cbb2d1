"""Run the README's command blocks as a user would type them (CI runs this after the tests).

    python scripts/run_readme_blocks.py [--readme README.md]

Every ```bash block after the first two (which .ci/run runs itself) is run line by line with bash, from the
repository root. A line that starts ``orthrus-export serve`` is started in the background; the lines after it run
against it once it answers, and it is stopped before the next ``orthrus-export build`` (or at the end). A line whose comment says
``exit code N (expected)`` must exit with N. Lines that need a GPU (``--gpu h100`` and the like) or hold placeholders
(``[--option]``) are skipped and listed. Exit 1 on the first line that fails, printing it.
"""

import argparse
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU = re.compile(r"--gpu (h100|h200|a100|l40s|auto)\b")


def lines_of(readme: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)[2:]
    return [ln for b in blocks for ln in b.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"run_readme_blocks: the server exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit("run_readme_blocks: the server did not become ready")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    a = ap.parse_args()
    server = None
    skipped, ran = [], 0
    try:
        for line in lines_of(Path(a.readme).read_text()):
            command = line.split("  #")[0].strip() if "  #" in line else line.strip()
            if GPU.search(command) or re.search(r"\[--?[\w-]+", command):
                skipped.append(command)
                continue
            expected = int(m.group(1)) if (m := re.search(r"exit code (\d+) \(expected\)", line)) else 0
            if server is not None and command.startswith("orthrus-export build"):
                stop(server)  # the commands that use the server are done; a rebuild would replace its engine
                server = None
            print(f"$ {command}", flush=True)
            if command.startswith("orthrus-export serve"):
                server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT)
                port = int(m.group(1)) if (m := re.search(r"--http-port (\d+)", command)) else 8000
                wait_ready(port, server)
                continue
            rc = subprocess.run(["bash", "-c", command], cwd=ROOT).returncode
            ran += 1
            if rc != expected:
                print(f"run_readme_blocks: `{command}` exited with {rc}, expected {expected}", file=sys.stderr)
                return 1
    finally:
        if server is not None:
            stop(server)
    print(f"run_readme_blocks: {ran} README commands ran as documented; skipped (GPU or placeholders): "
          + ("; ".join(skipped) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
