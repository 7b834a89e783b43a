import pytest

from edged.engine.request import GenerateRequest
from edged.engine.template import ChatTemplate
from edged.errors import RequestError, TemplateError

SMOL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_renders_like_transformers():
    out = ChatTemplate(SMOL).render([{"role": "user", "content": "Hi"}])
    assert out == "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_sandbox_blocks_python_internals():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])


def test_template_raise_exception_becomes_a_clear_error():
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        t.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "body,field",
    [
        ({}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"prompt": "x", "raw": "yes"}, "raw"),
        ({"prompt": "x", "options": {"temprature": 1}}, "options.temprature"),
        ({"prompt": "x" * 100}, "prompt"),
    ],
)
def test_request_errors_name_the_field(body, field):
    with pytest.raises(RequestError) as e:
        GenerateRequest.from_dict(body, max_prompt_chars=50)
    assert e.value.details.get("field") == field
    assert e.value.to_dict()["code"] == "invalid_request"
