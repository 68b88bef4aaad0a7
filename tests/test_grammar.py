"""JSON mode and JSON schemas: the automaton against Python's json module and the jsonschema library, and answers
held to them."""
from __future__ import annotations

import json
import random

import pytest

import lilmistral
from conftest import make_hf_model
from lilmistral.grammar import MAX_WHITESPACE, Grammar

JSON = Grammar("json")


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
        states = JSON.start
        for k, ch in enumerate(text):
            states = JSON.steps(states, ch)
            assert states, (text, text[:k + 1])
        assert JSON.accepts(text)
        j = r.randrange(len(text))
        changed = text[:j] + r.choice('{}[]",:0-.eE+ tfn\\x\x01') + text[j + 1:]
        try:
            is_object = isinstance(json.loads(changed), dict)
        except ValueError:
            is_object = False
        assert JSON.accepts(changed) == (is_object and not changed[0].isspace()), changed


@pytest.mark.parametrize("text", ['[1]', '"a"', '1', '{"a": 01}', '{"a": .5}', '{"a": 1.}', '{"a": -}', '{"a": tru}',
                                  "{'a': 1}", '{"a" 1}', '{"a": 1,}', '{"a": [1,]}', '{"a": "\x01"}', '{"a": 1}}',
                                  '{"a": "\\x"}', '{"a": "\\u12G4"}', '{a: 1}', '{"a": 1} ', ' {}',
                                  "{" + " " * (MAX_WHITESPACE + 1) + "}"])
def test_what_is_not_one_json_object_is_refused(text):
    assert not JSON.accepts(text)


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
        assert JSON.steps(JSON.start, answer) and answer.startswith("{"), answer
        if tiny.stats.done_reason == "stop":
            assert isinstance(json.loads(answer), dict)
        else:
            assert tiny.stats.done_reason == "length" and tiny.stats.eval_tokens == 40
    plain = "".join(tiny.chat([{"role": "user", "content": "Hi"}], seed=0, temperature=1.5, max_tokens=40))
    assert not JSON.steps(JSON.start, plain)  # the same weights, unconstrained
    with pytest.raises(lilmistral.LilmistralError, match="format: 'yaml' is not one lilmistral has"):
        list(tiny.chat([{"role": "user", "content": "Hi"}], format="yaml"))


def _pydantic_schemas():
    from typing import Literal, Optional

    from pydantic import BaseModel, Field

    class Address(BaseModel):
        street: str
        city: str = Field(max_length=12)
        zip: Optional[str] = None

    class Person(BaseModel):
        name: str = Field(min_length=1, max_length=20)
        age: int
        height_m: float
        languages: list[str] = Field(min_length=1, max_length=3)
        role: Literal["admin", "user", "guest"]
        address: Address
        friends: list["Person"] = []
        coords: tuple[float, float] | None = None

    return [Person.model_json_schema(), Address.model_json_schema()]


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "capital": {"type": "string"}},
     "required": ["name", "capital"]},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "number"}, "c": {"type": "boolean"},
                                      "d": {"type": "null"}, "e": {"type": ["string", "null"], "maxLength": 3}},
     "required": ["c"], "additionalProperties": {"type": "integer"}},
    {"type": "array", "items": {"enum": ["red", "re", 1, 10, None, {"x": [1]}]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"$ref": "#"}},
                                                      {"const": "x\"é"}]}}, "required": ["v"]},
    {"type": "object", "properties": {"t": {"type": "array", "prefixItems": [{"type": "string", "minLength": 2},
                                                                              {"type": "boolean"}], "items": False,
                                            "minItems": 1}}, "additionalProperties": False},
    {"type": "string", "minLength": 1, "maxLength": 4},
    {"type": "object", "additionalProperties": {"type": "object", "properties": {"k": {"type": "integer"}}}},
    *_pydantic_schemas(),
]


def instance(schema: dict, root: dict, r: random.Random, depth: int = 0):
    """A random value `schema` accepts (of the kinds SCHEMAS use), properties in the schema's order."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].split("/")[1:]:
            target = target[part]
        return instance(target, root, r, depth + 1)
    if "const" in schema or "enum" in schema:
        return r.choice([schema["const"]] if "const" in schema else schema["enum"])
    if "anyOf" in schema:
        options = schema["anyOf"][:1] if depth > 4 else schema["anyOf"]
        return instance(r.choice(options), root, r, depth + 1)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        return instance(schema | {"type": r.choice(kind)}, root, r, depth)
    if kind == "object":
        value = {name: instance(s, root, r, depth + 1) for name, s in schema.get("properties", {}).items()
                 if name in schema.get("required", []) or r.random() < 0.5 and depth < 4}
        extra = schema.get("additionalProperties", not schema.get("properties"))
        for i in range(r.randint(0, 2) if extra is not False and depth < 4 else 0):
            value[f"x{i}"] = instance(extra if isinstance(extra, dict) else {"type": "integer"}, root, r, depth + 1)
        return value
    if kind == "array":
        prefix = [instance(s, root, r, depth + 1) for s in schema.get("prefixItems", [])]
        least = max(schema.get("minItems", 0) - len(prefix), 0)
        most = least if schema.get("items") is False or depth > 3 else \
            min(schema.get("maxItems", len(prefix) + 3), len(prefix) + 3) - len(prefix)
        items = [instance(schema.get("items", {"type": "integer"}), root, r, depth + 1)
                 for _ in range(r.randint(least, max(least, most)))]
        return (prefix + items)[:max(schema.get("minItems", 0), r.randint(0, len(prefix) + len(items)))] \
            if schema.get("items") is False else prefix + items
    if kind == "string":
        return "".join(r.choice('ab"\\\n é中') for _ in range(r.randint(schema.get("minLength", 0),
                                                                     schema.get("maxLength", 6))))
    return {"integer": lambda: r.randint(-10**6, 10**6), "number": lambda: r.uniform(-1e3, 1e3) * 10**r.randint(-5, 5),
            "boolean": lambda: r.random() < 0.5, "null": lambda: None}[kind]()


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_a_schemas_values_are_taken_and_what_it_takes_it_accepts(index):
    """Random values of each schema, as json.dumps writes them (indented or not, ASCII or not), are taken whole;
    each changed (a character, a property left out or added, an array item left out) is taken only where the
    jsonschema library says the schema accepts it (and json.loads reads it)."""
    import jsonschema

    schema = SCHEMAS[index]
    grammar, validator, r = Grammar(schema), jsonschema.Draft202012Validator(schema), random.Random(index)
    taken_changes = 0
    for _ in range(300):
        value = instance(schema, schema, r)
        assert validator.is_valid(value), value
        text = json.dumps(value, ensure_ascii=r.random() < 0.5, indent=r.choice([None, 1, 2]))
        assert grammar.accepts(text), text
        j = r.randrange(len(text))
        changes = [text[:j] + r.choice('{}[]",:0-.eE+ tfn\\x\x01a') + text[j + 1:], text[:j] + text[j + 1:]]
        if isinstance(value, dict) and value:
            changes.append(json.dumps({k: v for k, v in value.items() if k != r.choice(list(value))}))
            changes.append(json.dumps(value | {"new": 1}))
        if isinstance(value, list) and value:
            changes.append(json.dumps(value[1:]))
        for changed in changes:
            if grammar.accepts(changed):
                taken_changes += changed != text
                assert validator.is_valid(json.loads(changed)), changed
    assert taken_changes > 0  # the changes test something: some of them are still values of the schema


@pytest.mark.parametrize("schema, words", [
    ({"type": "integer"}, "a bare number is not supported"),
    ({"anyOf": [{"type": "object"}, {"type": "number"}]}, "a bare number is not supported"),
    ({"type": "strnig"}, "type 'strnig' is not one of"),
    ({"type": "object", "properties": {"a": {"not": {}}}}, "#/properties/a: the schema keyword 'not' is not"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required property 'b' is not among"),
    ({"$ref": "https://example.com/s.json"}, "only references within the schema"),
    ({"$ref": "#/$defs/Missing"}, "points at nothing"),
    ({"type": "object", "properties": {"a": {"enum": []}}}, "enum must be a list of at least one value"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems 3 is more than maxItems 2"),
    ({"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}, "minItems 2 is more than the 1 items"),
    ({"type": "string", "maxLength": -1}, "must be whole numbers >= 0"),
    ({"allOf": [{}, {}]}, "allOf must be a list of one schema"),
    ({"type": "object", "anyOf": [{}]}, "anyOf beside 'type' is not supported"),
    ({"type": "object", "properties": {"a": 5}}, "a schema is an object"),
    ([1], "is not one lilmistral has"),
])
def test_schemas_it_cannot_hold_to_are_refused_in_one_line(schema, words):
    with pytest.raises(lilmistral.LilmistralError, match="^format: .*" + words.replace("(", r"\(")):
        Grammar(schema)


def test_a_schema_that_nests_too_deeply_or_leaves_too_many_ways_open_is_one_line():
    """Schemas are untrusted (a request's): 3,000 nested arrays (Python's recursion) and nested anyOf options that
    begin alike (their ways multiply: 400,000 states, 5.7 s for one text before the cap) are refused in one line."""
    deep = {"type": "string"}
    for _ in range(3000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(lilmistral.LilmistralError, match="^format: the schema nests too deeply$"):
        Grammar({"type": "object", "properties": {"a": deep}})
    alike = {"anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}}] * 40}
    for _ in range(4):
        alike = {"type": "object", "properties": {"a": {"anyOf": [alike] * 10}}}
    grammar = Grammar({"type": "object", "properties": {"x": alike}})
    with pytest.raises(lilmistral.LilmistralError, match="^format: the schema leaves over 1024 ways open"):
        grammar.steps(grammar.start, '{"x": {"a": {"a": {"a": {"a": {"a": "')


def test_a_random_models_answer_to_a_schema_is_a_value_of_it(tiny):
    """Random weights, sampled hot, held to each schema: every answer that finished is a value the schema accepts
    (jsonschema), every other one the beginning of one, cut at max_tokens."""
    import jsonschema

    finished = 0
    for index, schema in enumerate(SCHEMAS):
        grammar = Grammar(schema)
        for seed in range(2):
            answer = "".join(tiny.chat([{"role": "user", "content": "Hi"}], format=schema, seed=seed,
                                       temperature=1.5, top_k=0, top_p=1.0, max_tokens=60))
            assert grammar.steps(grammar.start, answer), (index, answer)
            if tiny.stats.done_reason == "stop":
                jsonschema.validate(json.loads(answer), schema)
                finished += 1
            else:
                assert tiny.stats.done_reason == "length" and tiny.stats.eval_tokens == 60
    assert finished >= len(SCHEMAS) // 2, finished


def test_a_pydantic_model_class_is_its_schema(tiny):
    """format=Model (a pydantic class) holds the answer as format=Model.model_json_schema() does; its answer is
    one the class reads back."""
    from typing import Literal

    from pydantic import BaseModel

    class Forecast(BaseModel):
        unit: Literal["celsius", "fahrenheit"]
        sunny: bool

    question = [{"role": "user", "content": "Hi"}]
    answer = "".join(tiny.chat(question, format=Forecast, temperature=0))
    assert answer == "".join(tiny.chat(question, format=Forecast.model_json_schema(), temperature=0))
    assert tiny.stats.done_reason == "stop" and isinstance(Forecast.model_validate_json(answer), Forecast)
