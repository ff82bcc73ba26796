"""Rebuilds sentiment.csv.gz from VADER's human-rated ground truth (see README.md here).

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2
    python maas/datasets/make_sentiment.py vaderSentiment-3.3.2.tar.gz

Each snippet's label comes from its mean rating by 20 raters on -4 (most negative) .. +4: below -1
negative, above +1 positive, else neutral (three classes of 7.3k, 8.0k and 8.3k rows). Tweets' HTML
entities are unescaped, exact duplicate texts dropped (the first kept).
"""

from __future__ import annotations

import html
import io
import sys
import tarfile
from pathlib import Path

import pandas as pd

SOURCES = {"tweet": "tweets_GroundTruth.txt", "movie_review": "movieReviewSnippets_GroundTruth.txt",
           "product_review": "amazonReviewSnippets_GroundTruth.txt",
           "editorial": "nytEditorialSnippets_GroundTruth.txt"}
NEUTRAL_BAND = 1.0


def read_ground_truth(sdist: Path) -> pd.DataFrame:
    with tarfile.open(sdist) as outer:
        inner_member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        inner = tarfile.open(fileobj=io.BytesIO(outer.extractfile(inner_member).read()))
        frames = []
        for source, name in SOURCES.items():
            member = next(m for m in inner.getmembers() if m.name.endswith("/" + name))
            rows = []
            for line in inner.extractfile(member).read().decode("utf-8", "replace").splitlines():
                parts = line.split("\t")
                if len(parts) >= 3:
                    rows.append((html.unescape("\t".join(parts[2:]).strip()), source, float(parts[1])))
            frames.append(pd.DataFrame(rows, columns=["text", "source", "rating"]))
    return pd.concat(frames, ignore_index=True)


def main(sdist: str) -> None:
    frame = read_ground_truth(Path(sdist)).drop_duplicates("text")
    frame["sentiment"] = pd.cut(frame.pop("rating"), [-10, -NEUTRAL_BAND, NEUTRAL_BAND, 10],
                                labels=["negative", "neutral", "positive"]).astype(str)
    out = Path(__file__).with_name("sentiment.csv.gz")
    frame.to_csv(out, index=False, compression={"method": "gzip", "mtime": 0})
    print(f"{out}: {len(frame)} rows, {frame.sentiment.value_counts().to_dict()}")


if __name__ == "__main__":
    main(sys.argv[1])
