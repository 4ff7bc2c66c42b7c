"""Write intraslice/knowledge_openings.txt: the openings whose greedy completions by the dense model make
the calibration's statements (intraslice/generated.py), such as "The capital of Peru is" or "Lagos is a
city in", over the countries and languages of pycountry (ISO 3166 and 639, in the `test` extra) and the
cities of the time-zone database.

Every entity named in benchmarks/fact_recall.py's prompts or answers is left out, so that the benchmark
measures recall of facts the calibration did not state.

    .venv/bin/python benchmarks/knowledge_openings.py [OUT.txt]
"""
from __future__ import annotations

import argparse
import os
import zoneinfo
from pathlib import Path

import pycountry

from fact_recall import FACTS
from intraslice.generated import KNOWLEDGE_OPENINGS

CONTINENTS = ("Africa", "America", "Asia", "Australia", "Europe")


def entities() -> tuple[list[str], list[str], list[str]]:
    """Country, city and language names, without the benchmark's."""
    countries = [c.name for c in pycountry.countries if "," not in c.name]
    cities = sorted({zone.split("/")[1].replace("_", " ") for zone in zoneinfo.available_timezones()
                     if zone.count("/") == 1 and zone.split("/")[0] in CONTINENTS})
    languages = [language.name for language in pycountry.languages if hasattr(language, "alpha_2")]
    named = {word.strip(",.") for prompt, answer in FACTS for word in f"{prompt} {answer}".split()
             if word[0].isupper() and len(word) >= 4 and word != "The"}
    return tuple([e for e in names if not any(word in e for word in named)]  # type: ignore[return-value]
                 for names in (countries, cities, languages))


def openings() -> list[str]:
    countries, cities, languages = entities()
    return ([f"The capital of {c} is" for c in countries] + [f"{c} is a country in" for c in countries]
            + [f"The official language of {c} is" for c in countries[::2]]
            + [f"{c} is a city in" for c in cities] + [f"The {name} language is spoken in" for name in languages])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=str(KNOWLEDGE_OPENINGS),
                        help=f"text file to write (default: {KNOWLEDGE_OPENINGS})")
    args = parser.parse_args()
    lines = openings()
    partial = f"{args.out}.partial"  # renamed when complete: never a half-written file
    Path(partial).write_text("\n".join(lines) + "\n")
    os.replace(partial, args.out)
    print(f"{len(lines)} openings -> {args.out}")


if __name__ == "__main__":
    main()
