"""Small files in GLUE's own layouts (GLUE.md), written where a test asks: the loaders' and
finetune's tests read them."""

from randbp_cli.data.tasks import GLUE_TASKS

# (header or None, rows) per task, as in GLUE's distributed TSV files (GLUE.md). Quotes inside
# text fields are deliberate: the reader must not treat them as CSV quoting.
GLUE_FILES = {
    "cola": (None, [["gj04", "1", "", 'The "sailors" rode the breeze clear of the rocks.'],
                    ["gj04", "0", "*", "The weights made the rope stretch over the pulley."],
                    ["gj04", "1", "", "The mechanical doll wriggled itself loose."]]),
    "sst2": (["sentence", "label"], [["it 's a charming and often affecting journey . ", "1"],
                                     ['unflinchingly bleak and " desperate ', "0"]]),
    "mrpc": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             [["1", "702876", "702977", 'Amrozi accused his brother , whom he called " the witness " .',
               "Referring to him as only \" the witness \" , Amrozi accused his brother ."],
              ["0", "2108705", "2108831", "Yucaipa owned Dominick 's before selling .",
               "Yucaipa bought Dominick 's in 1995 ."]]),
    "qqp": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [["133273", "213221", "213222", "How is the life of a math student?", "Which level of prepration?", "0"],
             ["402555", "536040", "536041", "How do I control my horny emotions?", "How do you control your horniness?",
              "1"],
             ["1", "2", "this row is malformed"]]),
    "stsb": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"],
             [["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane is taking off.",
               "An air plane is taking off.", "5.000"],
              ["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", "A man is playing a flute.",
               "A man is playing a bamboo flute.", "3.800"]]),
    "mnli": (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
             [["0", "31193", "31193n", "government", "( ( x ) )", "( y )", "(ROOT x)", "(ROOT y)",
               "Conceptually cream skimming has two basic dimensions.",
               "Product and geography are what make cream skimming work.", "neutral", "neutral"],
              ["1", "101457", "101457e", "telephone", "( a )", "( b )", "(ROOT a)", "(ROOT b)",
               "you know during the season", "You lose the things to the following level.", "entailment",
               "entailment"],
              ["2", "1", "1c", "fiction", "(a)", "(b)", "(a)", "(b)", "One of our number will carry out.",
               "A member of my team will execute your orders.", "contradiction", "contradiction"]]),
    "qnli": (["index", "question", "sentence", "label"],
             [["0", "When did the third Digimon series begin?", "Unlike the two seasons before it.",
               "not_entailment"],
              ["1", "Which missile batteries often have individual launchers?", "When MANPADS is operated.",
               "entailment"]]),
    "rte": (["index", "sentence1", "sentence2", "label"],
            [["0", "No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq.",
              "not_entailment"],
             ["1", "A place of sorrow, after Pope John Paul II died.", "Pope Benedict XVI is the new leader.",
              "entailment"]]),
    "wnli": (["index", "sentence1", "sentence2", "label"],
             [["0", "I stuck a pin through a carrot.", "The carrot had a hole.", "1"],
              ["1", "John couldn't see the stage with Billy in front of him.", "John is so short.", "0"]]),
}

EXPECTED_LABELS = {"cola": [1, 0, 1], "sst2": [1, 0], "mrpc": [1, 0], "qqp": [0, 1], "stsb": [5.0, 3.8],
                   "mnli": [1, 0, 2], "qnli": [1, 0], "rte": [1, 0], "wnli": [1, 0]}


def write_glue_task(root, task):
    spec = GLUE_TASKS[task]
    folder = root / spec.tsv.folder
    folder.mkdir(parents=True, exist_ok=True)
    header, rows = GLUE_FILES[task]
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    for name in spec.tsv.files.values():
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
