"""MovieLens-shaped ratings written in the test (nothing can be downloaded).

``ratings.csv`` is ``userId,movieId,rating,timestamp`` (+ an extra column the template ignores),
``movies.csv`` is ``movieId,title,genres`` (pipe-separated genres), as in the GroupLens files.
The structure is real, not a lookup of answers: movies have a latent vector around their main
genre's centre and a quality; users' tastes mix one or two genre centres; popularity is Zipf.
Which movies a user rates follows popularity and taste, the rating follows the match
(taste x movie + quality + noise, rounded to 1..5 stars), and timestamps are epoch seconds
spread over each user's active period (so a global time cut leaves history before it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

GENRES = ["Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Horror", "Musical", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
WORDS = ["night", "city", "last", "river", "dark", "summer", "king", "love", "road", "star", "secret",
         "house", "blue", "war", "game", "dream", "lost", "wild", "fire", "island"]
START = 946_684_800  # 2000-01-01 UTC, epoch seconds
SPAN = 3 * 365 * 86_400


@dataclass
class MovieLens:
    ratings: pd.DataFrame
    movies: pd.DataFrame
    bad: pd.DataFrame  # the bad rows appended to ratings.csv, with the reason a reader must give


def generate(num_users: int = 500, num_movies: int = 240, num_genres: int = 8, dim: int = 8,
             mean_ratings: float = 45.0, seed: int = 11) -> MovieLens:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_genres, dim))
    genre = rng.integers(0, num_genres, num_movies)
    second = rng.integers(0, num_genres, num_movies)
    movie_v = centres[genre] + 0.5 * rng.normal(size=(num_movies, dim))
    movie_v /= np.linalg.norm(movie_v, axis=1, keepdims=True)
    quality = rng.normal(0, 0.4, num_movies)
    log_pop = -0.9 * np.log1p(rng.permutation(num_movies))  # Zipf popularity, random order of ids
    home = rng.integers(0, num_genres, (num_users, 2))
    mix = rng.uniform(0.55, 1.0, (num_users, 1))
    taste = mix * centres[home[:, 0]] + (1 - mix) * centres[home[:, 1]] + 0.4 * rng.normal(size=(num_users, dim))
    taste /= np.linalg.norm(taste, axis=1, keepdims=True)
    affinity = taste @ movie_v.T  # [users, movies]
    z = (affinity - affinity.mean()) / affinity.std()
    counts = np.clip(rng.lognormal(np.log(mean_ratings), 0.5, num_users).astype(int), 12, num_movies // 2)
    starts = rng.uniform(0, 0.6 * SPAN, num_users)
    ends = np.minimum(starts + rng.uniform(0.35 * SPAN, SPAN, num_users), SPAN)
    rows = []
    for u in range(num_users):
        pick = np.argsort(-(log_pop + 1.5 * z[u] + rng.gumbel(size=num_movies)))[:counts[u]]  # what they watch
        stars = np.clip(np.rint(2.9 + 1.1 * z[u, pick] + quality[pick] + rng.normal(0, 0.6, len(pick))), 1, 5)
        when = START + rng.uniform(starts[u], ends[u], len(pick)).astype(np.int64)
        rows.append(pd.DataFrame({"userId": u + 1, "movieId": pick + 1, "rating": stars, "timestamp": when}))
    ratings = pd.concat(rows, ignore_index=True).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    ratings["source"] = rng.choice(["web", "app", "tv"], len(ratings))  # a column the template does not read
    titles = [f"{WORDS[a].title()} {WORDS[b]} ({1950 + y})" for a, b, y in
              zip(rng.integers(0, len(WORDS), num_movies), rng.integers(0, len(WORDS), num_movies),
                  rng.integers(0, 70, num_movies))]
    genres = [GENRES[g] if g == s else f"{GENRES[g]}|{GENRES[s]}" for g, s in zip(genre, second)]
    movies = pd.DataFrame({"movieId": np.arange(1, num_movies + 1), "title": titles, "genres": genres})
    bad = pd.DataFrame({"userId": ["7", "", "12", ""], "movieId": ["3", "5", "9", "11"],
                        "rating": ["four", "4.0", "4 stars", "2.5"],
                        "timestamp": [str(START + SPAN + i) for i in range(4)], "source": "web",
                        "reason": ["rating: cannot read 'four' as double", "user_id (your 'userId') is empty",
                                   "rating: cannot read '4 stars' as double", "user_id (your 'userId') is empty"]})
    return MovieLens(ratings, movies, bad)


def write(data: MovieLens, folder: Path) -> tuple[Path, Path]:
    """``ratings.csv`` (the good rows with the bad ones mixed in) and ``movies.csv`` under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    text = data.ratings.astype(str)
    bad = data.bad.drop(columns="reason")
    mixed = pd.concat([text.iloc[:100], bad, text.iloc[100:]], ignore_index=True)
    ratings, movies = folder / "ratings.csv", folder / "movies.csv"
    mixed.to_csv(ratings, index=False)
    data.movies.to_csv(movies, index=False)
    return ratings, movies


def expected_rejects(bad: pd.DataFrame) -> dict[str, str]:
    """``{reject id: reason}`` of the bad rows: the id is ``user/movie/timestamp`` as written ('?' for
    a blank), the reason names the template's column (and the user's name for it)."""
    return {f"{u or '?'}/{m}/{t}": why for u, m, t, why in zip(bad.userId, bad.movieId, bad.timestamp, bad.reason)}
