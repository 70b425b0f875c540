"""Prompt helpers of the shipped task YAMLs (`!function utils.<name>`), as lm-eval-harness 0.4.13 defines
them for COPA (super_glue/copa/utils.py), HellaSwag (hellaswag/utils.py) and WinoGrande
(winogrande/preprocess_winogrande.py)."""
import re


def _lower_first(choice):
    return choice[0].lower() + choice[1:]


def copa_doc_to_text(doc):
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def copa_doc_to_target(doc):
    correct = doc["choice1"] if doc["label"] == 0 else doc["choice2"]
    return " " + _lower_first(correct)


def copa_doc_to_choice(doc):
    return [" " + _lower_first(doc["choice1"]), " " + _lower_first(doc["choice2"])]


def _hellaswag_preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artifacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    def _process(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_preprocess(ending) for ending in doc["endings"]],
                "gold": int(doc["label"])}

    return dataset.map(_process)


def winogrande_doc_to_text(doc):
    return {"1": 0, "2": 1}[str(doc["answer"])]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
