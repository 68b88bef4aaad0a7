"""The real REPL in a pseudo-terminal (pexpect), on SmolLM2 converted to int4."""
from __future__ import annotations

import errno
import io
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pexpect
import pytest
from rich.cells import cell_len
from rich.console import Console
from rich.markdown import Markdown

import lilmistral
from conftest import in_terminal, screen, smollm2_gguf
from lilmistral.cli import main, parse_args
from lilmistral.convert import convert
from lilmistral.repl import AutoSave, Chat, WrappedAnswer, run_command, say, stream_answer

PROMPT = ">>>"  # prompt-toolkit draws the space after it with a cursor move
NEXT_PROMPT = r"\n(?:\x1b\[[0-9;?]*[A-Za-z]|\r)*>>>"  # a fresh prompt line, not the redraw of the one just sent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "smol-int4"
    convert(smollm2_gguf(), out, "int4")
    return out


@pytest.fixture
def spawn(smol, tmp_path):
    children = []

    def start(*args: str) -> pexpect.spawn:
        env = {**os.environ, "LILMISTRAL_HOME": str(tmp_path / "home"), "PROMPT_TOOLKIT_NO_CPR": "1",
               "TERM": "xterm"}
        child = pexpect.spawn(sys.executable, ["-m", "lilmistral", "run", str(smol), *args], env=env,
                              encoding="utf-8", timeout=90, dimensions=(50, 200))
        children.append(child)
        child.expect_exact(PROMPT)
        return child

    yield start
    for child in children:
        child.close(force=True)


def test_the_start_shows_one_spinner_whose_words_follow_the_steps(smol, tmp_path):
    """`run` showed "loading model..." and, inside it, a spinner of each step's own: the two redrew one line in
    turn: the words flickered between "loading model..." and "warming up"."""
    written = in_terminal("run", str(smol), "Hi", "--max-tokens", "2",
                          env={**os.environ, "LILMISTRAL_HOME": str(tmp_path / "home")})
    frames = re.findall(r"[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]\x1b\[0m ([a-z][^\r\x1b⠋]*)", written)  # each frame's words
    shown = [words for words, _ in itertools.groupby(frames)]
    steps = iter(["loading model...", "preparing the CPU kernels (built once, under a minute)", "loading model...",
                  "warming up"])
    assert shown and all(words in steps for words in shown), shown  # in the steps' order (a step under ~80 ms,
    # between two of the spinner's frames, may not show)


def ask(child: pexpect.spawn, text: str) -> str:
    child.sendline(text)
    child.expect(NEXT_PROMPT)
    return ANSI.sub("", child.before)


def test_question_streams_an_answer_and_bye_exits(spawn, tmp_path):
    child = spawn("--temperature", "0")  # greedy: the default temperature once answered "Kyoto"
    assert "Tokyo" in ask(child, "What is the capital of Japan?")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "home" / "history").read_text()
    assert "What is the capital of Japan?" in history


def test_temperature_zero_is_repeatable_and_commands(spawn, tmp_path):
    child = spawn()
    assert "temperature" in ask(child, "/set temperature 0")
    ask(child, "/set max_tokens 24")
    # the answer follows the last echo of the question (prompt-toolkit may redraw the input line once more)
    first = ask(child, "Name a color.").rsplit("Name a color.", 1)[1]
    ask(child, "/clear")
    second = ask(child, "Name a color.").rsplit("Name a color.", 1)[1]
    assert first.strip() and first.strip() == second.strip()
    assert "unknown command" in ask(child, "/frobnicate")
    assert "needs a float" in ask(child, "/set temperature hot")
    assert "unknown parameter" in ask(child, "/set warmth 1")
    assert "No system message" in ask(child, "/show system")
    ask(child, '/set system "Answer in one word."')
    assert "Answer in one word." in ask(child, "/show system")
    assert "int4" in ask(child, "/show info")
    assert "im_start" in ask(child, "/show template")
    assert "0.0" in ask(child, "/show parameters")
    assert "Traceback" not in child.before


def test_multiline_input(spawn):
    child = spawn()
    ask(child, "/set temperature 0")
    child.sendline('"""')
    child.expect_exact("...")
    child.sendline("What is the capital")
    child.expect_exact("...")
    child.sendline('of Japan?"""')
    child.expect(NEXT_PROMPT)
    assert "Tokyo" in child.before


def test_bracketed_paste_of_several_lines_is_one_message(spawn):
    child = spawn()
    ask(child, "/set temperature 0")
    child.send("\x1b[200~What is the capital\nof Japan?\x1b[201~")  # what a terminal sends for a paste
    out = ask(child, "")
    assert "Tokyo" in out and out.count("The capital") <= 1


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(spawn):
    child = spawn()
    ask(child, "/set max_tokens 2000")
    child.sendline("Write a very long story about a dragon who learns to cook, with many chapters.")
    child.expect(r"chapters\.(?:\x1b\[[0-9;?]*[A-Za-z])*\r\r?\n")  # the input, accepted
    child.expect(r"[A-Za-z]+ [A-Za-z]+ [A-Za-z]+ [A-Za-z]+ ")  # then some words of the answer
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect(NEXT_PROMPT)
    child.sendintr()  # at an empty prompt: a hint, not an exit
    child.expect_exact("Use Ctrl + d or /bye to exit.")
    child.expect(NEXT_PROMPT)
    ask(child, "/set temperature 0")
    ask(child, "/set max_tokens 24")
    ask(child, "/clear")  # how much of the story was kept depends on timing; 135M parameters follow it
    assert "Tokyo" in ask(child, "What is the capital of Japan?")
    child.sendeof()
    child.expect(pexpect.EOF)


def test_save_and_load_restore_the_conversation(spawn, tmp_path):
    saved = tmp_path / "chat.json"
    child = spawn()
    ask(child, "/set temperature 0")
    ask(child, "What is the capital of Japan?")
    assert "Saved" in ask(child, f"/save {saved}")
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"] and "Tokyo" in data["messages"][1]["content"]
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child = spawn("--verbose")
    assert "Loaded 2 messages" in ask(child, f"/load {saved}")
    out = ask(child, "And of France?")
    assert "Paris" in out and "prompt eval count" in out
    assert "not a saved conversation" in ask(child, f"/load {tmp_path / 'missing.json'}")


def test_every_answer_is_saved_and_a_crashed_chat_resumes(spawn, smol, tmp_path, monkeypatch):
    """The chat saves the conversation after every answer, so a REPL killed outright loses nothing: `run
    --resume` shows the last exchange and goes on in the same file (the model remembers it); /clear starts
    a file of its own; a one-shot `run --resume PROMPT` answers inside the latest conversation, a one-shot
    run without it saves nothing."""
    folder = tmp_path / "home" / "conversations"
    child = spawn("--temperature", "0", "--max-tokens", "24")
    ask(child, "What is the capital of Japan?")
    [saved] = folder.glob("*.json")
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert saved.name.endswith(f"-{smol.name}.json")
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and "Tokyo" in messages[1]["content"]
    child.kill(signal.SIGKILL)

    child = spawn("--resume", "--temperature", "0", "--verbose")  # the recap's ">>> question" is its prompt
    assert f"Resumed 2 messages from {saved}" in ANSI.sub("", child.before)
    child.expect_exact("Type a message")
    assert ANSI.sub("", child.before).split() == "What is the capital of Japan? The capital of Japan is Tokyo.".split()
    child.expect_exact(PROMPT)
    out = ask(child, "And of France?")
    assert "Paris" in out and "prompt eval count" in out
    assert [m["role"] for m in json.loads(saved.read_text())["messages"]] == ["user", "assistant"] * 2
    assert f"saved to       {saved}" in ask(child, "/show info")
    ask(child, "/clear")
    assert "Set 'quiet' mode." in ask(child, "/set quiet")  # Ollama's: no timings from now on
    assert "prompt eval count" not in ask(child, "Name a color.")
    assert len(list(folder.glob("*.json"))) == 2
    child.sendline("/bye")
    child.expect(pexpect.EOF)

    monkeypatch.setenv("LILMISTRAL_HOME", str(tmp_path / "home"))
    latest = max(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
    run = ["run", str(smol), "--temperature", "0", "--max-tokens", "8"]
    assert main([*run, "--resume", "And another one?"]) == 0
    assert len(json.loads(latest.read_text())["messages"]) == 4
    assert main([*run, "Hello"]) == 0
    assert len(list(folder.glob("*.json"))) == 2


@pytest.mark.parametrize("signal_number", [signal.SIGHUP, signal.SIGTERM])
def test_a_closed_terminal_or_a_shutdown_mid_answer_keeps_the_answer_so_far(spawn, tmp_path, signal_number):
    """SIGHUP (the terminal window closed) or SIGTERM (the machine shutting down) while an answer streams: the
    chat saves the question and what was written of the answer, then exits with 128 + the signal's number.
    Before, either signal ended the process where it stood and the turn was lost."""
    child = spawn("--max-tokens", "2000")
    child.sendline("Write a very long story about a dragon who learns to cook, with many chapters.")
    child.expect(r"chapters\.(?:\x1b\[[0-9;?]*[A-Za-z])*\r\r?\n")
    child.expect(r"[A-Za-z]+ [A-Za-z]+ [A-Za-z]+ [A-Za-z]+ ")
    child.kill(signal_number)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 128 + signal_number
    [saved] = (tmp_path / "home" / "conversations").glob("*.json")
    question, answer = json.loads(saved.read_text())["messages"]
    assert question["content"].startswith("Write a very long story") and len(answer["content"].split()) >= 4


def test_one_conversation_resumed_twice_at_once_keeps_both(smol, tmp_path):
    """Two chats that resumed the same conversation: the first to answer goes on in its file, the other in a
    file of its own (it would otherwise rewrite the file without the first one's exchange), and says where."""
    llm = lilmistral.load(smol)
    folder = tmp_path / "conversations"

    def chat() -> Chat:
        c = Chat(llm, autosave=AutoSave(folder, "smol"))
        c.set("temperature", "0")
        c.set("max_tokens", "4")
        return c

    start = chat()
    "".join(start.ask("Hi"))
    first, second = chat(), chat()
    assert first.autosave.resume(first) == second.autosave.resume(second) == start.autosave.path
    "".join(first.ask("What is 2 + 2?"))
    assert first.notice() is None and first.autosave.path == start.autosave.path
    "".join(second.ask("Name a color."))
    assert second.autosave.path != start.autosave.path
    assert second.notice() == (f"({start.autosave.path.name} was changed by another chat; this one goes on in "
                               f"{second.autosave.path})")
    asked = {p.name: [m["content"] for m in json.loads(p.read_text())["messages"][::2]] for p in folder.iterdir()}
    assert asked == {start.autosave.path.name: ["Hi", "What is 2 + 2?"],
                     second.autosave.path.name: ["Hi", "Name a color."]}
    "".join(second.ask("Another?"))  # its own file from now on, with no further notice
    assert second.notice() is None and len(list(folder.iterdir())) == 2
    assert AutoSave(folder, "smol").latest(start.model) == second.autosave.path


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the files synced by /proc/self/fd")
def test_a_conversion_and_a_saved_answer_are_on_the_disk_before_they_are_renamed_into_place(smol, tmp_path,
                                                                                           monkeypatch):
    """A machine that goes down (power lost) after a rename may keep the new name without the data not yet on
    the disk: a converted model (whose download `pull` deletes after converting) or a conversation could be
    left empty. Each file is flushed to the disk before it is renamed into place, and its folder after."""
    events = []

    def recorded(kind: str, real):
        def call(*args):
            names = [os.readlink(f"/proc/self/fd/{a}") if kind == "sync" else os.fspath(a) for a in args]
            events.append((kind, *names))
            return real(*args)
        return call

    monkeypatch.setattr(os, "fsync", recorded("sync", os.fsync))
    monkeypatch.setattr(os, "rename", recorded("rename", os.rename))
    monkeypatch.setattr(os, "replace", recorded("rename", os.replace))
    out = convert(smollm2_gguf(), tmp_path / "converted", "int4")
    (_, partial, target), = [e for e in events if e[0] == "rename"]
    assert target == str(out)
    before = events[:events.index(("rename", partial, target))]
    assert {("sync", f"{partial}/{p.name}") for p in out.iterdir()} | {("sync", partial)} <= set(before)
    assert events[-1] == ("sync", str(tmp_path))

    events.clear()
    chat = Chat(lilmistral.load(smol), autosave=AutoSave(tmp_path / "conversations", "smol"))
    chat.set("max_tokens", "2")
    "".join(chat.ask("Hi"))
    path = str(chat.autosave.path)
    (_, tmp, target), = [e for e in events if e[0] == "rename"]
    assert target == path and events[-2:] == [("rename", tmp, path), ("sync", str(tmp_path / "conversations"))]
    assert ("sync", tmp) in events[:-2] and json.loads(chat.autosave.path.read_text())["messages"][0]["content"] == "Hi"

    def refused(fd):  # as a file system that cannot sync a folder does
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refused)
    "".join(chat.ask("Hi again"))  # saved all the same
    assert len(json.loads(chat.autosave.path.read_text())["messages"]) == 4


def test_bytes_that_are_not_utf8_are_replaced_not_a_crash(smol, tmp_path):
    """Piped input, arguments and the REPL's input in another encoding (or junk) reach Python as lone
    surrogates, which neither a tokenizer nor a saved conversation takes: each such byte becomes U+FFFD."""
    env = {**os.environ, "LILMISTRAL_HOME": str(tmp_path / "home")}
    run = [sys.executable, "-m", "lilmistral", "run", str(smol), "--max-tokens", "3", "--temperature", "0"]
    for args, stdin in (([], b"caf\xe9 \xff?"), ([os.fsdecode(b"caf\xe9?")], b"")):
        r = subprocess.run(run + args, input=stdin, capture_output=True, env=env, timeout=120)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr.decode(errors="replace")
    chat = Chat(lilmistral.load(smol), autosave=AutoSave(tmp_path / "conversations", "smol"))
    chat.set("max_tokens", "3")
    "".join(chat.ask(os.fsdecode(b"caf\xe9?")))
    assert json.loads(chat.autosave.path.read_text())["messages"][0]["content"] == "caf\ufffd?"


def test_resume_without_a_saved_conversation_is_one_line(smol, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LILMISTRAL_HOME", str(tmp_path / "home"))
    assert main(["run", str(smol), "--resume", "hi"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"Error: no saved conversation with {smol} to resume "
                                                        f"(in {tmp_path / 'home' / 'conversations'})")


def test_counts_below_their_least_are_usage_errors(capsys):
    """Not a stage count of 0 taken as 1, nor a traceback from a benchmark of no tokens."""
    for argv, said in ((["run", "m", "--pp", "0"], "argument --pp: 0 is less than 1"),
                       (["show", "m", "--pp", "-1"], "argument --pp: -1 is less than 1"),
                       (["bench", "m", "--prompt-tokens", "0"], "argument --prompt-tokens: 0 is less than 1"),
                       (["bench", "m", "--gen-tokens", "1"], "argument --gen-tokens: 1 is less than 2"),
                       (["bench", "m", "--gen-tokens", "x"], "argument --gen-tokens: invalid int value: 'x'")):
        with pytest.raises(SystemExit) as exit:
            parse_args(argv)
        assert exit.value.code == 2 and said in capsys.readouterr().err, argv
    assert parse_args(["bench", "m", "--prompt-tokens", "1", "--gen-tokens", "2", "--pp", "2"]).gen_tokens == 2


def test_the_prompt_may_follow_options_unquoted():
    """As `ollama run MODEL why is the sky blue`: the prompt's words anywhere after the model."""
    assert parse_args(["run", "m", "--verbose", "why", "is", "the", "sky", "blue?"]).prompt == "why is the sky blue?"
    assert parse_args(["run", "m", "why", "--temperature", "0", "not"]).prompt == "why not"
    assert parse_args(["run", "m", "--resume"]).prompt is None
    for argv in (["run", "m", "--verbose", "--bogus"], ["list", "extra"]):
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_load_takes_only_a_conversation_that_alternates(smol, tmp_path):
    chat = Chat(lilmistral.load(smol))
    path = tmp_path / "edited.json"
    for roles in (["user", "user"], ["user"], ["assistant", "user"]):
        path.write_text(json.dumps({"messages": [{"role": r, "content": "x"} for r in roles]}))
        with pytest.raises(lilmistral.LilmistralError, match="must alternate"):
            chat.load(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}))
    assert chat.load(path) == 2


def test_load_checks_the_options_and_save_a_folder_that_is_not_there(smol, tmp_path):
    """An edited file's options are checked as /set checks them (one failed later, at the next answer), and
    the chat is left as it was; /save somewhere it cannot write is one line."""
    chat = Chat(lilmistral.load(smol))
    path = tmp_path / "edited.json"
    answered = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    for extra, said in (({"options": {"temperature": "hot"}}, "could not convert string to float"),
                        ({"options": {"top_p": 5}}, "top_p must be in"), ({"options": [1]}, "not a saved"),
                        ({"system": 5}, "the system prompt text")):
        path.write_text(json.dumps({"messages": answered, **extra}))
        with pytest.raises(lilmistral.LilmistralError, match=said):
            chat.load(path)
        assert chat.messages == [] and chat.params.top_p == 0.9
    path.write_text(json.dumps({"messages": answered, "system": "s", "options": {"seed": None, "temperature": 0.5}}))
    assert chat.load(path) == 2 and (chat.system, chat.params.temperature, chat.params.seed) == ("s", 0.5, None)
    with pytest.raises(lilmistral.LilmistralError, match="could not save the conversation to .*: No such file"):
        run_command(chat, f"/save {tmp_path / 'missing' / 'x.json'}")
    assert not (tmp_path / "missing").exists()


def test_version(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--version"])
    assert capsys.readouterr().out == f"lilmistral {lilmistral.__version__}\n"


def test_set_takes_ollamas_names_too(smol):
    chat = Chat(lilmistral.load(smol))
    run_command(chat, "/set parameter temperature 0")  # Ollama's form
    run_command(chat, "/set num_predict 5")  # Ollama's name for max_tokens
    run_command(chat, "/set repeat_last_n -1")
    assert (chat.params.temperature, chat.params.max_tokens, chat.params.repeat_last_n) == (0.0, 5, -1)
    assert "repeat_last_n   -1" in run_command(chat, "/show parameters")
    run_command(chat, "/set verbose")
    assert chat.verbose
    assert run_command(chat, "/set nowordwrap") == "Set 'nowordwrap' mode." and not chat.wrap  # as Ollama's
    with pytest.raises(lilmistral.LilmistralError, match="repeat_last_n must be between -1"):
        run_command(chat, "/set repeat_last_n -2")
    "".join(chat.ask("Hi"))
    assert chat.llm.stats.eval_tokens <= 5
    assert run_command(chat, "/set format json") == "Set format to 'json' mode." and chat.params.format == "json"
    assert "".join(chat.ask("Hi")).lstrip().startswith("{")  # JSON mode, as Ollama's /set format json
    assert run_command(chat, "/set noformat") == "Disabled format." and chat.params.format is None


def test_second_turn_reuses_the_first_turns_cache(smol):
    chat = Chat(lilmistral.load(smol))
    run_command(chat, "/set temperature 0")
    "".join(chat.ask("What is the capital of Japan?"))
    first = chat.llm.stats
    "".join(chat.ask("And of France?"))
    second = chat.llm.stats
    new_turn = second.prompt_tokens - first.prompt_tokens - first.eval_tokens
    assert new_turn > 0
    # only the new turn (and the end-of-turn tokens around it) runs: not the first question, nor its answer
    assert second.prefill_tokens <= new_turn + 2
    assert second.prompt_tokens - second.prefill_tokens >= first.prompt_tokens + first.eval_tokens - 2


def test_piped_text_goes_before_the_prompt(smol):
    """`lilmistral run MODEL "Summarize:" < notes.txt` (or `cat notes.txt | ...`) asks about the file, as Ollama
    does: the piped text, a blank line, the prompt's words. Before, with a prompt, standard input was ignored."""
    run = [sys.executable, "-m", "lilmistral", "run", str(smol), "--format", "json", "--max-tokens", "1"]
    question = "What is the secret word?"
    r = subprocess.run([*run, question], input="The secret word is banana.\n", capture_output=True, text=True,
                       timeout=120)
    expected = lilmistral.load(smol).tokenize_chat([{"role": "user", "content": f"The secret word is banana.\n\n"
                                                                                f"{question}"}])
    assert r.returncode == 0 and json.loads(r.stdout)["prompt_tokens"] == len(expected), r.stderr
    r = subprocess.run([*run, question], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert json.loads(r.stdout)["prompt_tokens"] < len(expected)  # /dev/null is not read


def test_pipes_and_json_output(smol):
    env = {**os.environ, "TERM": "xterm"}
    r = subprocess.run([sys.executable, "-m", "lilmistral", "run", str(smol), "--temperature", "0"],
                       input="What is the capital of Japan?\n", capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "Tokyo" in r.stdout and "\x1b[" not in r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "lilmistral", "run", str(smol), "What is the capital of Japan?",
                        "--temperature", "0", "--format", "json"], capture_output=True, text=True, timeout=120, env=env)
    data = json.loads(r.stdout)
    assert "Tokyo" in data["response"] and data["eval_tokens"] > 0 and data["prompt_tokens"] > 0
    assert data["done_reason"] == "stop"  # the end-of-sequence token, not max_tokens or the context
    assert 0 < data["load_s"] < data["total_s"] < 60
    r = subprocess.run([sys.executable, "-m", "lilmistral", "run", str(smol), "hi", "--temperature", "-1"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "temperature" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("columns", [20, 41, 80])
def test_answers_at_a_terminal_wrap_between_words(columns):
    """Words arrive in pieces of any size; on the screen no line reaches the last column, a word shorter than half
    a line is never split, and each line holds as many words as fit (the greedy fill)."""
    rng = random.Random(columns)
    words = ["".join(rng.choices("abcdefghij", k=rng.randint(1, columns // 2 - 1))) for _ in range(300)]
    words += ["東京は", "首都"] * 5  # two cells a character
    rng.shuffle(words)
    text = "".join(w + rng.choice([" "] * 12 + ["\n"]) for w in words).rstrip() + "\n"
    written = io.StringIO()
    answer, at = WrappedAnswer(written, lambda: columns), 0
    while at < len(text):
        step = rng.randint(1, 8)
        answer.write(text[at:at + step])
        at += step
    expected = []
    for paragraph in text.split("\n")[:-1]:
        line = ""
        for word in paragraph.split(" "):
            if line and cell_len(line) + 1 + cell_len(word) >= columns:
                expected.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        expected.append(line)
    assert screen(written.getvalue(), columns, rows=len(expected) + 1) == expected + [""]


def test_a_word_of_half_a_line_or_more_is_broken_at_the_edge():
    written = io.StringIO()
    answer = WrappedAnswer(written, lambda: 20)
    for piece in ["a few ", "words", " then ", "x" * 30, " end"]:
        answer.write(piece)
    assert screen(written.getvalue(), 20)[:4] == ["a few words then", "xxxxxxxxxxxxxxxxxxx", "xxxxxxxxxxx end", ""]


def test_control_characters_in_an_answer_reach_a_terminal_made_visible(smol, monkeypatch):
    """A model's answer is untrusted text: an escape sequence in it (here one setting the window's title and one
    erasing the screen) is shown as `cat -v` shows it, never run by the terminal; a pipe gets the bytes as they
    are. So do the other things the chat prints (say)."""
    chat = Chat(lilmistral.load(smol))
    answer = "Hi\x1b]0;owned\x07 there\x1b[2J\x9b2J\r\tend"
    monkeypatch.setattr(chat.llm, "chat", lambda messages, **options: iter([answer[:5], answer[5:]]))
    for markdown in (False, True):
        terminal = io.StringIO()
        stream_answer(chat, "hello", Console(file=terminal, force_terminal=True, width=60), markdown, verbose=False)
        assert "\x1b]" not in terminal.getvalue() and "\x1b[2J" not in terminal.getvalue()
        shown = screen(terminal.getvalue(), 60)[0].strip()
        assert shown == "Hi^[]0;owned^G there^[[2JM-^[2J end"  # the tab: to column 32
    assert chat.messages[-1]["content"] == answer  # the conversation keeps what the model wrote
    piped = io.StringIO()
    stream_answer(chat, "hello", Console(file=piped, force_terminal=False), markdown=False, verbose=False)
    assert "\x1b]0;owned" in piped.getvalue() and "\x1b[2J" in piped.getvalue()
    terminal = io.StringIO()
    say(Console(file=terminal, force_terminal=True), "a template \x1b[2J")
    assert "\x1b[2J" not in terminal.getvalue() and "a template ^[[2J" in screen(terminal.getvalue(), 80)[0]


def test_a_one_shot_answer_at_a_narrow_terminal_keeps_its_words_whole(smol):
    prompt = ["Write a poem about the sea.", "--temperature", "0", "--max-tokens", "60"]
    r = subprocess.run([sys.executable, "-m", "lilmistral", "run", str(smol), *prompt, "--format", "json"],
                       capture_output=True, text=True, timeout=120)
    words = json.loads(r.stdout)["response"].split()
    for extra, whole in (([], True), (["--nowordwrap"], False)):
        lines = [line for line in screen(in_terminal("run", str(smol), *prompt, *extra, columns=32), 32) if line]
        assert (" ".join(lines).split() == words) is whole
        assert max(map(len, lines)) < 32 if whole else max(map(len, lines)) == 32


def test_an_error_at_a_terminal_shows_its_control_characters():
    """An error can quote a file's text (a config's architecture, a template's fault): at a terminal, its escape
    sequences are made visible as the chat's are; piped, the message is as it was."""
    model = "/nonexistent/\x1b]0;owned\x1b\\.gguf"
    assert "Error: /nonexistent/^[]0;owned^[\\.gguf: no such model folder or file" in in_terminal("run", model, "Hi")
    r = subprocess.run([sys.executable, "-m", "lilmistral", "run", model, "Hi"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == f"Error: {model}: no such model folder or file\n"


def test_a_markdown_answer_taller_than_the_screen_is_drawn_once(smol, monkeypatch):
    """--markdown: the answer, streamed in pieces of any size (one every 10 ms, as a model writes them) into a
    terminal of 12 rows, ends up exactly as rich renders the whole text at once. Before, the whole answer was
    redrawn at every token, and once taller than the screen it was drawn again below itself at every frame
    (here the title appeared 11 times); later, one block taller than the screen still was (a code block's first
    line 8 times)."""
    text = ("# A title\n\nSome **bold** text and `code`, a paragraph\nthat goes on.\n\n1. first\n2. second\n\n"
            "   continued under second\n\n- a bullet\n- another\n\n```python\ndef f(x):\n\n    return x\n```\n\n"
            "## Part two\n\n" + "Words of a long paragraph. " * 20 + "\n\n```python\n" +
            "".join(f"line_{i} = {i} * 2\n" for i in range(30)) + "```\n\nLast words.")
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, len(text)), 250))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    chat = Chat(lilmistral.load(smol))

    def chat_slowly(messages, **options):
        for piece in pieces:
            time.sleep(0.01)
            yield piece

    monkeypatch.setattr(chat.llm, "chat", chat_slowly)
    streamed, whole = io.StringIO(), io.StringIO()
    stream_answer(chat, "hi", Console(file=streamed, force_terminal=True, width=60, height=12), markdown=True,
                  verbose=False)
    Console(file=whole, force_terminal=True, width=60).print(Markdown(text))
    shown = "\n".join(screen(streamed.getvalue(), 60, rows=12)).rstrip()  # the rows below stay blank
    expected = "\n".join(screen(whole.getvalue(), 60, rows=12)).rstrip()
    assert shown == expected and expected.count("A title") == 1 and expected.count("line_0 ") == 1
