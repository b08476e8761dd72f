"""The evaluation prompts: the DreamBooth paper's named sets, or a list from the config.

The paper (Ruiz et al. 2023, section 4.1 and its dataset card, google/dreambooth) evaluates every
subject on 25 prompts: for objects, 20 recontextualisations and 5 property modifications; for live
subjects (pets), 10 recontextualisations, 10 accessorisations and 5 property modifications. Each
template names the identifier and the class noun ("a sks backpack in the jungle"). CLIP-T compares
an image with its prompt *without* the identifier ("a backpack in the jungle"): the prompt as a
user would write it for the class, which is all a CLIP model understands.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from raybooth.platform.errors import ConfigError
from raybooth.platform.toy.subject import SUBJECT as TOY_SUBJECT

RECONTEXTUALISATION = "recontextualisation"
ACCESSORISATION = "accessorisation"
PROPERTY = "property"
CUSTOM = "custom"

_CONTEXTS = [
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
]
_OBJECT_ONLY_CONTEXTS = [
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
]
_ACCESSORIES = [
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
]
_PROPERTIES = [
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
]

# name -> [(template, category)]; `{}` is "<identifier> <class noun>".
PROMPT_SETS: dict[str, list[tuple[str, str]]] = {
    "object": [(t, RECONTEXTUALISATION) for t in _CONTEXTS + _OBJECT_ONLY_CONTEXTS]
    + [(t, PROPERTY) for t in _PROPERTIES],
    "live": [(t, RECONTEXTUALISATION) for t in _CONTEXTS]
    + [(t, ACCESSORISATION) for t in _ACCESSORIES]
    + [(t, PROPERTY) for t in _PROPERTIES],
}
# The toy world (raybooth.platform.toy): its subject on every background it is not made of. Only
# words the toy models' caption grammar knows; the toy judge reads the background back.
PROMPT_SETS["toy"] = [(f"a {{}} on a {bg} background", RECONTEXTUALISATION) for bg in TOY_SUBJECT.backgrounds()]
PROMPT_SET_ALIASES = {"objects": "object", "live-subject": "live", "live_subject": "live", "pets": "live"}


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: what the model is asked, and what CLIP-T compares the image with."""

    prompt: str  # with the identifier: what the personalised model generates from
    class_prompt: str  # without it: what CLIP-T reads
    category: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EvalPrompt":
        return cls(**data)


def strip_identifier(prompt: str, identifier: str) -> str:
    """The prompt without the identifier token (as a whole word), spaces collapsed."""
    return " ".join(w for w in prompt.split() if w != identifier)


def class_noun_from(instance_prompt: str, identifier: str) -> str:
    """'a photo of sks robot toy' -> 'robot toy': the words after the identifier."""
    words = instance_prompt.split()
    if identifier in words:
        rest = words[words.index(identifier) + 1 :]
        if rest:
            return " ".join(rest)
    raise ConfigError(
        f"evaluation.class_noun is not set and cannot be read from subject.instance_prompt "
        f"{instance_prompt!r} (no words after the identifier {identifier!r}); set it, e.g. "
        "evaluation.class_noun: dog",
        field="evaluation.class_noun",
    )


def build_prompts(
    *, prompt_set: str, prompts: list[str] | None, identifier: str, class_noun: str | None, instance_prompt: str
) -> list[EvalPrompt]:
    """The prompts of one evaluation, checked (a UserError names the field)."""
    if prompts is not None:
        cleaned = [p.strip() for p in prompts]
        if not cleaned or any(not p for p in cleaned):
            raise ConfigError(
                "evaluation.prompts is empty or holds an empty prompt: give at least one prompt "
                f"(with the identifier, e.g. 'a {identifier} dog in the snow'), or remove the key "
                "to use evaluation.prompt_set",
                field="evaluation.prompts",
            )
        out = []
        for p in cleaned:
            class_prompt = strip_identifier(p, identifier)
            if not class_prompt:
                raise ConfigError(
                    f"evaluation.prompts: {p!r} is only the identifier; CLIP-T needs words to compare with",
                    field="evaluation.prompts",
                )
            out.append(EvalPrompt(prompt=p, class_prompt=class_prompt, category=CUSTOM))
        return out
    name = PROMPT_SET_ALIASES.get(prompt_set.strip().lower(), prompt_set.strip().lower())
    if name not in PROMPT_SETS:
        raise ConfigError(
            f"evaluation.prompt_set {prompt_set!r} is not a prompt set raybooth knows: use "
            f"{', '.join(repr(n) for n in PROMPT_SETS)} ('object' and 'live': the DreamBooth paper's "
            "25 prompts for objects and for live subjects; 'toy': the toy world's), or give your own "
            "list as evaluation.prompts",
            field="evaluation.prompt_set",
        )
    noun = (class_noun or "").strip() or class_noun_from(instance_prompt, identifier)
    return [
        EvalPrompt(prompt=template.format(f"{identifier} {noun}"), class_prompt=template.format(noun), category=cat)
        for template, cat in PROMPT_SETS[name]
    ]
