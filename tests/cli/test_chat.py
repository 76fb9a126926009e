"""`lorafit chat` and lorafit.generate.Chat on a tiny random Llama whose tokenizer has a ChatML template: the history
across turns, /reset, and the interactive program under a pseudo-terminal (Ctrl-D ends it, Ctrl-C stops an answer
and the session goes on, Ctrl-C at the prompt ends it). Every read waits for the text it needs, with a deadline,
so a broken program fails the test instead of hanging the suite."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import make_model_dir, with_chat_template
from lorafit import DataError
from lorafit.cli import main
from lorafit.generate import Chat, Sampling, decode, generate, load_for_inference, render

pytestmark = pytest.mark.usefixtures("one_thread")
DEADLINE = 120  # seconds for one expected piece of output (a cold start imports torch and transformers)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    plain = make_model_dir(d / "plain")
    return {"plain": plain, "chat": with_chat_template(plain, d / "chat")}


# --- the conversation -------------------------------------------------------------------------------------------

def test_chat_keeps_the_history_and_reset_forgets_it(dirs):
    model, tok = load_for_inference(dirs["chat"])
    chat = Chat(model, tok, system="be brief", sampling=Sampling(max_new_tokens=6))
    first = chat.reply("hello")
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert first == decode(tok, generate(model, tok, render(tok, messages=turns), max_new_tokens=6))
    second = chat.reply("and then?")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == first and chat.messages[4]["content"] == second
    turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    assert second == decode(tok, generate(model, tok, render(tok, messages=turns), max_new_tokens=6))
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "be brief"}]
    assert chat.reply("hello") == first  # greedy: the same question on a fresh history, the same answer


def test_a_stopped_answer_keeps_its_text_in_the_history(dirs):
    model, tok = load_for_inference(dirs["chat"])
    chat = Chat(model, tok, sampling=Sampling(max_new_tokens=50))
    calls = []
    answer = chat.reply("hello", stop=lambda: calls.append(1) or len(calls) >= 2)
    assert chat.messages[-1] == {"role": "assistant", "content": answer}
    full = generate(model, tok, render(tok, prompt="hello"), max_new_tokens=50)
    assert answer == decode(tok, full[:2])


def test_chat_needs_a_chat_template(dirs, capsys):
    model, tok = load_for_inference(dirs["plain"])
    with pytest.raises(DataError, match=f"tokenizer of {dirs['plain']} has no chat template"):
        Chat(model, tok)
    assert main(["chat", "--model", str(dirs["plain"])]) == 2
    out = capsys.readouterr()
    assert out.out == "" and [line for line in out.err.splitlines() if "error" in line] == [
        f"lorafit: error: the tokenizer of {dirs['plain']} has no chat template (tokenizer_config.json "
        "'chat_template'), so a conversation cannot be rendered; pass a plain prompt, or a model whose tokenizer has "
        "a chat template"]


def test_chat_from_a_pipe_until_exit(dirs, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\n\nagain\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(dirs["chat"]), "--max-new-tokens", "4", "--system", "be brief"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and out.count("you> ") == 5 and "(history cleared)" in out


# --- the interactive program ------------------------------------------------------------------------------------

# The child makes the pseudo-terminal its controlling terminal (setsid by start_new_session, then TIOCSCTTY), so
# that Ctrl-C typed there becomes SIGINT for it, as in a real terminal. It also takes Python's own SIGINT handler:
# a suite started as a background job of a script (`cmd &`, nohup) inherits SIGINT ignored, and the Ctrl-C tests
# then waited for an exit that never came.
CHILD = ("import fcntl, runpy, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
         "signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv[0] = 'lorafit'; "
         "runpy.run_module('lorafit', run_name='__main__', alter_sys=True)")


class Terminal:
    """``lorafit ARGV`` on a pseudo-terminal: ``expect`` reads until a text appears (or fails at a deadline)."""

    def __init__(self, *argv: str):
        master, slave = os.openpty()
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.fd, self.out, self.pos = master, b"", 0

    def _read(self, until: float) -> bool:
        """Read what is there (waiting until ``until``); False at the end of the output."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # EIO: every writer of the terminal is gone
            chunk = b""
        self.out += chunk
        return bool(chunk)

    def expect(self, text: str, timeout: float = DEADLINE) -> str:
        """The output from the last expected text up to and including ``text``."""
        want, until = text.encode(), time.monotonic() + timeout
        while want not in self.out[self.pos:]:
            if time.monotonic() > until or not self._read(until):
                self.kill()
                raise AssertionError(f"no {text!r} in the output; it ends with {self.out[-1500:]!r}")
        end = self.out.index(want, self.pos) + len(want)
        seen, self.pos = self.out[self.pos:end], end
        return seen.decode(errors="replace")

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait_until_reading(self, timeout: float = DEADLINE) -> None:
        """Wait until the program sleeps in its read of the terminal (Linux: the kernel function it waits in).

        A Ctrl-C that comes after the prompt is written but before that read starts is only noted by Python: its
        KeyboardInterrupt waits for the read to return. A person is never that fast; a test is."""
        wchan, until = Path(f"/proc/{self.proc.pid}/wchan"), time.monotonic() + timeout
        while wchan.exists() and time.monotonic() < until:
            if any(f in wchan.read_text() for f in ("poll_schedule_timeout", "do_select", "n_tty_read", "wait_woken")):
                return
            self._read(time.monotonic() + 0.01)  # keeps the output flowing while it waits
        assert not wchan.exists(), f"the program does not wait for input; it ends with {self.out[-1500:]!r}"

    def exit_code(self, timeout: float = DEADLINE) -> int:
        until = time.monotonic() + timeout
        while time.monotonic() < until and self._read(until):
            pass
        try:
            return self.proc.wait(timeout=max(1.0, until - time.monotonic()))
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def start(*argv) -> Terminal:
        opened.append(Terminal(*map(str, argv)))
        return opened[-1]

    yield start
    for t in opened:
        if t.fd >= 0:
            t.kill()


def test_chat_in_a_terminal_answers_resets_and_ends_at_ctrl_d(dirs, terminal):
    t = terminal("chat", "--model", dirs["chat"], "--max-new-tokens", 8)
    t.expect("you> ")
    t.send(b"hello\n")
    first = t.expect("you> ")
    assert "model> " in first and len(first.split("model> ")[1].strip()) > len("you> ")
    t.send(b"/reset\n")
    t.expect("(history cleared)")
    t.expect("you> ")
    t.send(b"how are you\n")
    assert "model> " in t.expect("you> ")
    t.send(b"\x04")  # Ctrl-D at an empty prompt
    assert t.exit_code() == 0


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(dirs, terminal):
    t = terminal("chat", "--model", dirs["chat"], "--max-new-tokens", 100000)
    t.expect("you> ")
    for question in (b"tell me everything\n", b"and again\n"):
        t.send(question)
        t.expect("model> ")  # the Ctrl-C handler is in place from here to the end of the answer
        t.send(b"\x03")
        t.expect("(answer stopped)")
        t.expect("you> ")
    t.wait_until_reading()
    t.send(b"\x03")  # Ctrl-C at the prompt ends the session
    assert t.exit_code() == 0
    assert b"Traceback" not in t.out and b"lorafit: interrupted" not in t.out

