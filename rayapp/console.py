"""What a person sees of a run in the terminal, and where everything else goes.

`rayapp run` (without ``-v``) runs a job inside :func:`captured`: file descriptors 1 and 2 of this
process (so every line Ray forwards from its workers, and whatever a library or a child process
prints) go through a pipe into ``output_dir/logs/console.log``. The terminal gets:

- what rayapp says with :func:`say`: stage headers, result tables, the answer of a deployed model;
- rayapp's own lines from anywhere, workers included: a line that starts with ``[NAME]`` where
  NAME is a job or stage being run (:func:`watch`), such as the step loop's few progress lines
  and "resuming from checkpoint at step N", after Ray's ``(RayTrainWorker pid=...)`` prefix is
  taken off; and rayapp's ``WARNING:`` lines.

Everything else (Ray's, vLLM's, Serve's and transformers' output) is only in the log; on failure
the CLI prints the error and the log's path. ``rayapp -v run`` shows everything live, as before.
Outside :func:`captured` (tests, notebooks, ``-v``) :func:`say` is a plain print.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from pathlib import Path

_state: _Capture | None = None
_names: set[str] = set()
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\((?:[\w.:-]+ )?pid=\d+(?:, ip=[^)]*)?\) ")
_TAG = re.compile(r"^\[([^\]]+)\] ")


def watch(name: str) -> None:
    """Lines tagged ``[name]`` are rayapp's own and reach the terminal."""
    _names.add(name)


def shown(line: str) -> str | None:
    """The text of a captured ``line`` as the terminal shows it, or None for the log only."""
    text = _RAY_PREFIX.sub("", _ANSI.sub("", line), count=1)
    m = _TAG.match(text)
    if (m and m.group(1) in _names) or text.startswith("WARNING: "):
        return text
    return None


def say(text: str = "") -> None:
    """A line (or lines) for the person running the job: on the terminal, and in the log."""
    if _state is None:
        print(text, flush=True)
    else:
        _state.say(text)


class _Capture:
    def __init__(self, path: Path, terminal_fd: int):
        self.path = path
        self.log = open(path, "ab", buffering=0)
        self.terminal = os.fdopen(terminal_fd, "w", buffering=1)
        self.lock = threading.Lock()
        self.live = True
        self.read_fd, self.write_fd = os.pipe()
        self.thread = threading.Thread(target=self._pump, daemon=True, name="rayapp-console")
        self.thread.start()

    def say(self, text: str) -> None:
        self.drain(0.5)  # what was printed before comes first
        with self.lock:
            self.log.write((text + "\n").encode())
            if self.live:
                self.terminal.write(text + "\n")
                self.terminal.flush()

    def _pump(self) -> None:
        """Copy the pipe into the log; pass rayapp's lines to the terminal. Runs until the process
        ends (a child may still hold the pipe after the capture is over)."""
        pending = b""
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self.lock:
                self.log.write(chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if self.live:
                    for raw in lines:
                        text = shown(raw.decode("utf-8", "replace").rstrip("\r"))
                        if text is not None:
                            self.terminal.write(text + "\n")
                    self.terminal.flush()

    def drain(self, timeout: float = 2.0) -> None:
        """Wait until the pipe holds nothing more (what was written before the capture ended)."""
        import fcntl
        import termios

        deadline = time.monotonic() + timeout
        buf = bytearray(4)
        while time.monotonic() < deadline:
            try:
                fcntl.ioctl(self.read_fd, termios.FIONREAD, buf)
            except OSError:
                return
            if int.from_bytes(buf, sys.byteorder) == 0:
                time.sleep(0.05)  # the pump may still be writing its last chunk
                return
            time.sleep(0.05)


@contextlib.contextmanager
def captured(log_path: str | os.PathLike):
    """Send this process's stdout and stderr (and its children's) to ``log_path`` (appended),
    passing rayapp's own lines to the terminal (see the module docstring). Restores both on exit."""
    global _state
    if _state is not None:  # nested: already captured
        yield Path(log_path)
        return
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    state = _Capture(path, os.dup(saved_out))
    state.log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n".encode())
    os.dup2(state.write_fd, 1)
    os.dup2(state.write_fd, 2)
    os.close(state.write_fd)
    _state = state
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        state.drain()
        with state.lock:
            state.live = False
            state.terminal.close()
        _state = None
