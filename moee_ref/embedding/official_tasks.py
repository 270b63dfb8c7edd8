"""What the authors' MTEB evaluation (eval_mteb.py) sets, for the official mode: its batch size and the task
instructions it puts before every sentence. (No torch here: the command line's help reads it.)

It passes --batch_size (default 64) to every encode call; their README runs 128.

It uses, by default (no --no_instruction), the E5 instruction of each task
(from E5's evaluation, intfloat/e5 utils) in the GritLM format:

    "<|user|>\\n" + instruction + "\\n<|embed|>\\n"      or "<|embed|>\\n" for an empty instruction

(the instruction first stripped of ":", " " and newlines at its ends). The result is glued to the front
of each sentence *before* their preprocessing and prompt template, so it ends up inside the template's
quotes, gets a "." appended when it has no sentence after it, and its underscores become spaces. The
markers are plain text to these tokenizers, not special tokens.

Retrieval and reranking tasks have one instruction for queries and one for the corpus; a retrieval
corpus's is empty, which the format still turns into "<|embed|>\\n". `instruction=None` (their
--no_instruction) puts nothing before the sentence; `instruction=""` puts "<|embed|>\\n".

The table holds the entries their evaluation has enabled: the paper's tasks and the BEIR retrieval set.
"""

from __future__ import annotations

from ..errors import InputError

OFFICIAL_BATCH_SIZE = 64

STS = "Retrieve semantically similar text."
_SIMILAR_TWEET = "Retrieve tweets that are semantically similar to the given tweet"


def _same(text: str) -> dict[str, str]:
    return {"query": text, "corpus": text}


def _query(text: str) -> dict[str, str]:
    return {"query": text, "corpus": ""}


# task name -> instruction, or {"query": ..., "corpus": ...}
E5_INSTRUCTIONS: dict[str, str | dict[str, str]] = {
    # Classification
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six emotions: "
                             "anger, fear, joy, love, sadness, and surprise",
    "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic",
    "TweetSentimentExtractionClassification": "Classify the sentiment of a given tweet as either positive, negative, or neutral",
    # Clustering
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    # PairClassification
    "TwitterSemEval2015": _SIMILAR_TWEET,
    "TwitterURLCorpus": _SIMILAR_TWEET,
    # Reranking
    "AskUbuntuDupQuestions": _same("Retrieve duplicate questions from AskUbuntu forum"),
    "SciDocsRR": _same("Given a title of a scientific paper, retrieve the titles of other relevant papers"),
    "StackOverflowDupQuestions": _same("Retrieve duplicate questions from StackOverflow forum"),
    # Retrieval
    "ArguAna": _query("Given a claim, find documents that refute the claim"),
    "ClimateFEVER": _query("Given a claim about climate change, retrieve documents that support or refute the claim"),
    "CQADupstackRetrieval": _query("Given a question, retrieve detailed question descriptions from Stackexchange that are "
                                   "duplicates to the given question"),
    "DBPedia": _query("Given a query, retrieve relevant entity descriptions from DBPedia"),
    "FEVER": _query("Given a claim, retrieve documents that support or refute the claim"),
    "FiQA2018": _query("Given a financial question, retrieve user replies that best answer the question"),
    "HotpotQA": _query("Given a multi-hop question, retrieve documents that can help answer the question"),
    "MSMARCO": _query("Given a web search query, retrieve relevant passages that answer the query"),
    "NFCorpus": _query("Given a question, retrieve relevant documents that best answer the question"),
    "NQ": _query("Given a question, retrieve Wikipedia passages that answer the question"),
    "QuoraRetrieval": _query("Given a question, retrieve questions that are semantically equivalent to the given question"),
    "SCIDOCS": _query("Given a scientific paper title, retrieve paper abstracts that are cited by the given paper"),
    "SciFact": _query("Given a scientific claim, retrieve documents that support or refute the claim"),
    "Touche2020": _query("Given a question, retrieve detailed and persuasive arguments that answer the question"),
    "TRECCOVID": _query("Given a query on COVID-19, retrieve documents that answer the query"),
    # STS
    **{name: STS for name in ("STS12", "STS13", "STS14", "STS15", "STS16", "BIOSSES", "SICK-R", "STSBenchmark")},
    # Summarization
    "SummEval": "Given a news summary, retrieve other semantically similar summaries",
}
# Other names mteb gives the same data.
_ALIASES = {"SummEvalSummarization.v2": "SummEval"}


def instruction_prefix(instruction: str | None) -> str:
    """What the authors' code puts before each sentence for `instruction` (None: nothing, their --no_instruction)."""
    if instruction is None:
        return ""
    if not isinstance(instruction, str):
        raise InputError(f"instruction must be a string or None, got {type(instruction).__name__}")
    text = instruction.strip(": \n")
    return f"<|user|>\n{text}\n<|embed|>\n" if text else "<|embed|>\n"


def e5_instruction(task_name: str, prompt_type: str | None = None) -> str:
    """The E5 instruction of an MTEB task; prompt_type "query" or "document" picks a side where a task has two."""
    name = "CQADupstackRetrieval" if task_name.startswith("CQADupstack") else _ALIASES.get(task_name, task_name)
    if name not in E5_INSTRUCTIONS:
        raise InputError(
            f"the authors' evaluation has no E5 instruction for MTEB task {task_name!r} (it skips such tasks); "
            "pass an instruction text of your own, or no instruction"
        )
    entry = E5_INSTRUCTIONS[name]
    if isinstance(entry, str):
        return entry
    return entry["corpus" if prompt_type == "document" else "query"]
