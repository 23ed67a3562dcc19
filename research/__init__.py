"""The research harness behind `scripts/`: the non-IID quality benchmark and its multiple-choice items. Not part of
the product package: it drives fedchain from outside, as a researcher would."""
