"""JSON mode: the automaton against Python's json module, and answers held to one JSON object."""
from __future__ import annotations

import json
import random

import pytest

import lilmistral
from conftest import make_hf_model
from lilmistral.grammar import MAX_WHITESPACE, START, json_step, json_steps


def random_value(r: random.Random, depth: int = 0):
    kind = r.random()
    if depth > 3 or kind < 0.3:
        text = "".join(r.choice('ab"\\/\n\t\x7fé中😀 {}[],:') for _ in range(r.randint(0, 8)))
        return r.choice([r.randint(-10**6, 10**6), r.uniform(-1e6, 1e6), r.random() * 10 ** r.randint(-30, 30),
                         True, False, None, text])
    if kind < 0.65:
        return [random_value(r, depth + 1) for _ in range(r.randint(0, 4))]
    return {"".join(r.choice('k"\\x é') for _ in range(r.randint(0, 5))): random_value(r, depth + 1)
            for _ in range(r.randint(0, 4))}


def test_every_prefix_of_a_json_object_goes_on_and_only_json_objects_finish():
    """3,000 random objects as json.dumps writes them (indented or not, ASCII or not): every prefix is taken and
    the whole finishes; each with one character changed finishes only where json.loads reads an object, and
    every such object (whitespace runs within the limit) finishes."""
    r = random.Random(0)
    for i in range(3000):
        text = json.dumps({str(i): random_value(r)}, ensure_ascii=r.random() < 0.5, indent=r.choice([None, 1, 2]))
        state = START
        for k, ch in enumerate(text):
            state = json_step(state, ch)
            assert state is not None, (text, text[:k + 1])
        assert state[1] == "done"
        j = r.randrange(len(text))
        changed = text[:j] + r.choice('{}[]",:0-.eE+ tfn\\x\x01') + text[j + 1:]
        try:
            is_object = isinstance(json.loads(changed), dict)
        except ValueError:
            is_object = False
        state = json_steps(START, changed)
        assert (state is not None and state[1] == "done") == (is_object and not changed[0].isspace()), changed


@pytest.mark.parametrize("text", ['[1]', '"a"', '1', '{"a": 01}', '{"a": .5}', '{"a": 1.}', '{"a": -}', '{"a": tru}',
                                  "{'a': 1}", '{"a" 1}', '{"a": 1,}', '{"a": [1,]}', '{"a": "\x01"}', '{"a": 1}}',
                                  '{"a": "\\x"}', '{"a": "\\u12G4"}', '{a: 1}', '{"a": 1} ', ' {}',
                                  "{" + " " * (MAX_WHITESPACE + 1) + "}"])
def test_what_is_not_one_json_object_is_refused(text):
    state = json_steps(START, text)
    assert state is None or state[1] != "done"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grammar")
    make_hf_model(folder, "mistral", sliding_window=None)
    return lilmistral.load(folder)


def test_a_random_models_answer_in_json_mode_is_json_so_far(tiny):
    """Random weights, sampled hot: whatever the answer, it is the beginning of one JSON object (and one that
    finished is one); the sampler drew only tokens the constraint allowed."""
    for seed in range(4):
        answer = "".join(tiny.chat([{"role": "user", "content": "Hi"}], format="json", seed=seed, temperature=1.5,
                                   top_k=0, top_p=1.0, max_tokens=40))
        state = json_steps(START, answer)
        assert state is not None and answer.startswith("{"), answer
        if tiny.stats.done_reason == "stop":
            assert isinstance(json.loads(answer), dict)
        else:
            assert tiny.stats.done_reason == "length" and tiny.stats.eval_tokens == 40
    plain = "".join(tiny.chat([{"role": "user", "content": "Hi"}], seed=0, temperature=1.5, max_tokens=40))
    assert json_steps(START, plain) is None  # the same weights, unconstrained
    with pytest.raises(lilmistral.LilmistralError, match="format 'yaml' is not one lilmistral has"):
        list(tiny.chat([{"role": "user", "content": "Hi"}], format="yaml"))
