"""Pure text and token operations for corpus preparation: Unicode/control-character
normalisation, script counting and quality filters (``clean``), PII masking (``pii``),
fill-in-the-middle rearrangement for code (``fim``), MinHash-LSH near-duplicate
detection on token ids (``minhash``) and n-gram overlap with evaluation sets
(``decontam``). Nothing here reads or writes files, so every function can run
unchanged inside worker processes over tens of GB and be tested on literals."""
