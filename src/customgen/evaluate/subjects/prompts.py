"""Prompt sets of the subject evaluation, as data: templates with `{token}` (the rare token) and `{noun}` (the class).

- PROJECT_PROMPTS: the project's five prompts (one scene, one weather, an accessory, a style change, a surface),
  in the spirit of the subject DreamBooth+LoRA report this project follows (its exact five are not published).
- DREAMBOOTH_OBJECT_PROMPTS / DREAMBOOTH_LIVE_PROMPTS: the 25 + 25 prompts of the DreamBooth evaluation
  (Ruiz et al., CVPR 2023), copied from google/dreambooth, dataset/prompts_and_classes.txt (commit 4f887af), where
  they read `'a {0} {1} in the jungle'.format(unique_token, class_token)`.
- LIVE_CLASSES: the classes of that dataset's live subjects (dog, cat) plus people and other animals (the project's
  addition: the subject recipe's default class is `person`). A live class gets the live-subject prompts.
"""
from __future__ import annotations

import re

from customgen.errors import UserError

PROJECT_PROMPTS = (
    "a {token} {noun} on the beach",
    "a {token} {noun} in the snow",
    "a {token} {noun} wearing a red hat",
    "a painting of a {token} {noun} in the style of Van Gogh",
    "a {token} {noun} on a wooden floor",
)
_SHARED = (  # the first ten prompts of both DreamBooth lists, in the file's order
    "a {token} {noun} in the jungle",
    "a {token} {noun} in the snow",
    "a {token} {noun} on the beach",
    "a {token} {noun} on a cobblestone street",
    "a {token} {noun} on top of pink fabric",
    "a {token} {noun} on top of a wooden floor",
    "a {token} {noun} with a city in the background",
    "a {token} {noun} with a mountain in the background",
    "a {token} {noun} with a blue house in the background",
    "a {token} {noun} on top of a purple rug in a forest",
)
_PROPERTIES = (  # the last five of both lists
    "a red {token} {noun}",
    "a purple {token} {noun}",
    "a shiny {token} {noun}",
    "a wet {token} {noun}",
    "a cube shaped {token} {noun}",
)
DREAMBOOTH_OBJECT_PROMPTS = _SHARED + (
    "a {token} {noun} with a wheat field in the background",
    "a {token} {noun} with a tree and autumn leaves in the background",
    "a {token} {noun} with the Eiffel Tower in the background",
    "a {token} {noun} floating on top of water",
    "a {token} {noun} floating in an ocean of milk",
    "a {token} {noun} on top of green grass with sunflowers around it",
    "a {token} {noun} on top of a mirror",
    "a {token} {noun} on top of the sidewalk in a crowded street",
    "a {token} {noun} on top of a dirt road",
    "a {token} {noun} on top of a white rug",
) + _PROPERTIES
DREAMBOOTH_LIVE_PROMPTS = _SHARED + (
    "a {token} {noun} wearing a red hat",
    "a {token} {noun} wearing a santa hat",
    "a {token} {noun} wearing a rainbow scarf",
    "a {token} {noun} wearing a black top hat and a monocle",
    "a {token} {noun} in a chef outfit",
    "a {token} {noun} in a firefighter outfit",
    "a {token} {noun} in a police outfit",
    "a {token} {noun} wearing pink glasses",
    "a {token} {noun} wearing a yellow shirt",
    "a {token} {noun} in a purple wizard outfit",
) + _PROPERTIES
# The dataset's live classes, then the project's additions ("animal" is not one: the dataset's plushies are the
# object class "stuffed animal").
LIVE_CLASSES = ("dog", "cat") + ("person", "man", "woman", "boy", "girl", "child", "baby", "people", "puppy",
                                 "kitten", "bird", "horse")
PROMPT_SETS = ("project", "dreambooth")  # eval.subject_prompts
CLASS_PROMPT = "a photo of a {noun}"  # PRES prompt when the manifest records no class prompt
_LEAD = re.compile(r"^(?:(?:an?|the)\s+)?(?:(?:photo|picture|image|portrait)\s+of\s+)?(?:(?:an?|the)\s+)?",
                   re.IGNORECASE)


def fill(template: str, *, token: str, noun: str) -> str:
    """A template with its token and class noun put in, whitespace tidied (an empty token leaves no gap)."""
    return " ".join(template.replace("{token}", token).replace("{noun}", noun).split())


def class_phrase(prompt: str) -> str:
    """The class of a class prompt: `a photo of dog` → `dog`, `a photo of a stuffed animal` → `stuffed animal`."""
    return " ".join(_LEAD.sub("", prompt.strip()).split()).strip(" .,").lower()


def class_noun(*, class_prompt: str, instance_prompt: str, token: str) -> str:
    """The subject's class: from the class prompt, else the word after the token in the instance prompt
    (`a photo of sks person` → `person`); "" when neither says."""
    if class_prompt.strip():
        return class_phrase(class_prompt)
    words = instance_prompt.split()
    if token and token in words and words.index(token) + 1 < len(words):
        return words[words.index(token) + 1].strip(" .,").lower()
    return ""


def is_live(noun: str) -> bool:
    """A live subject (its last word is a live class or their plural): the DreamBooth live-subject prompts."""
    last = noun.split()[-1] if noun.split() else ""
    return last in LIVE_CLASSES or last.removesuffix("s") in LIVE_CLASSES


def prompt_templates(name: str, noun: str) -> tuple[str, ...]:
    """The templates of a prompt set: `project`, or `dreambooth` (object or live by the class noun)."""
    if name not in PROMPT_SETS:
        raise UserError(f"unknown eval.subject_prompts {name!r}; choose from {', '.join(PROMPT_SETS)}")
    if name == "project":
        return PROJECT_PROMPTS
    return DREAMBOOTH_LIVE_PROMPTS if is_live(noun) else DREAMBOOTH_OBJECT_PROMPTS
