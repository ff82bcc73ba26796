"""Messy tables of the kind users bring: missing values, ID and date columns, stray strings in a
numeric column, a constant, booleans, heavy tails. Generated (seeded), so no data is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def churn_table(rows: int = 900, seed: int = 0) -> pd.DataFrame:
    """Customers who churned or stayed: an ID, a signup date, 7% of monthly_fee and 8% of region
    empty, a numeric column with stray "n/a" strings, a constant, and the target `churned`."""
    rng = np.random.default_rng(seed)
    tenure = rng.integers(1, 72, rows)
    fee = rng.normal(60, 20, rows).round(2)
    calls = rng.poisson(2, rows)
    plan = rng.choice(["basic", "plus", "premium"], rows, p=[0.5, 0.3, 0.2])
    region = rng.choice(["north", "south", "east", "west"], rows)
    risk = -0.04 * tenure + 0.03 * (fee - 60) + 0.5 * calls + (plan == "basic") * 0.8 + rng.normal(0, 0.7, rows)
    frame = pd.DataFrame({
        "customer_id": [f"C{100000 + index}" for index in range(rows)],
        "signup_date": pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 700, rows), unit="D"),
        "tenure_months": tenure,
        "monthly_fee": fee,
        "support_calls": calls.astype(object),
        "plan": plan,
        "region": region.astype(object),
        "country": "NL",
        "churned": np.where(risk > np.quantile(risk, 0.7), "yes", "no"),
    })
    frame["signup_date"] = frame["signup_date"].dt.strftime("%Y-%m-%d")
    frame.loc[rng.random(rows) < 0.07, "monthly_fee"] = np.nan
    frame.loc[rng.random(rows) < 0.08, "region"] = None
    frame.loc[rng.random(rows) < 0.02, "support_calls"] = "n/a"
    return frame


def loans_table(rows: int = 800, seed: int = 1) -> pd.DataFrame:
    """Loan applications that defaulted or not: an ID, a date, a heavy-tailed income with gaps, a
    boolean with gaps, categories with gaps, and the numeric target `defaulted` (0/1)."""
    rng = np.random.default_rng(seed)
    income = np.exp(rng.normal(10.5, 0.8, rows)).round(0)
    age = rng.integers(19, 75, rows)
    employment = rng.choice(["employed", "self-employed", "unemployed", "retired"], rows, p=[0.6, 0.2, 0.1, 0.1])
    homeowner = rng.random(rows) < 0.4
    amount = rng.uniform(1_000, 40_000, rows).round(-2)
    risk = 0.00004 * amount - 0.5 * np.log(income) + (employment == "unemployed") * 1.5 - 0.4 * homeowner + rng.normal(0, 0.6, rows)
    frame = pd.DataFrame({
        "application_id": rng.permutation(rows) + 50_000,
        "applied_on": (pd.Timestamp("2025-03-01") + pd.to_timedelta(rng.integers(0, 300, rows), unit="h")).astype(str),
        "income": income,
        "age": age,
        "employment": employment.astype(object),
        "homeowner": pd.Series(homeowner, dtype=object),
        "amount": amount,
        "purpose": rng.choice(["car", "home", "study", "other"], rows),
        "defaulted": (risk > np.quantile(risk, 0.75)).astype(int),
    })
    frame.loc[rng.random(rows) < 0.1, "income"] = np.nan
    frame.loc[rng.random(rows) < 0.05, "employment"] = None
    frame.loc[rng.random(rows) < 0.05, "homeowner"] = None
    return frame


def thresholds_table(rows: int = 3000, seed: int = 2) -> pd.DataFrame:
    """A target made of thresholds and interactions over heavy-tailed columns, with uninformative
    ones: the kind of table where tree ensembles lead networks (Grinsztajn et al. 2022)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({f"x{index}": rng.standard_t(2, rows) * rng.choice([1, 10, 100]) for index in range(8)})
    for index in range(8):
        frame[f"noise{index}"] = rng.lognormal(0, 2, rows)
    x = frame
    rule = ((x.x0 > 0.5) & (x.x1 < 0)) | ((x.x2 > 1) ^ (x.x3 > -0.5)) & (x.x4.abs() < 2)
    rule = rule ^ ((x.x5 > 3) & (x.x6 > 0))
    flip = rng.random(rows) < 0.05
    frame["label"] = np.where(rule ^ flip, "hit", "miss")
    return frame


def linear_table(rows: int = 1500, seed: int = 3) -> pd.DataFrame:
    """Three classes separated by linear boundaries with label noise: a linear model is enough."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (rows, 10))
    scores = x @ rng.normal(0, 1, (10, 3)) + rng.gumbel(0, 0.5, (rows, 3))
    frame = pd.DataFrame(x, columns=[f"f{index}" for index in range(10)])
    frame["label"] = np.array(["a", "b", "c"])[scores.argmax(1)]
    return frame


def sparse_table(rows: int = 400, columns: int = 300, seed: int = 6) -> pd.DataFrame:
    """Two classes by a linear rule over 3 of 300 columns: where an L1 penalty finds the few and an
    L2 one spreads its weight over the noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (rows, columns))
    frame = pd.DataFrame(x, columns=[f"g{index}" for index in range(columns)])
    frame["label"] = np.where(x[:, 0] + x[:, 1] - x[:, 2] + rng.normal(0, 0.3, rows) > 0, "on", "off")
    return frame


def large_table(rows: int = 24_000, seed: int = 4) -> pd.DataFrame:
    """Many rows, mixed types, gaps: 24k orders, returned or kept."""
    rng = np.random.default_rng(seed)
    price = np.exp(rng.normal(3.5, 1.0, rows)).round(2)
    days = rng.integers(0, 30, rows)
    category = rng.choice(["shoes", "shirts", "books", "toys", "tools"], rows, p=[0.3, 0.3, 0.2, 0.1, 0.1])
    channel = rng.choice(["web", "app", "store"], rows)
    rating = rng.integers(1, 6, rows).astype(float)
    risk = (0.02 * days + (category == "shoes") * 1.2 + (category == "shirts") * 0.6 - 0.4 * (rating - 3)
            + 0.3 * np.log(price) - 0.8 * (channel == "store") + rng.normal(0, 1, rows))
    frame = pd.DataFrame({"order_id": np.arange(rows) + 1_000_000, "price": price, "days_to_deliver": days,
                          "category": category, "channel": channel, "rating": rating,
                          "returned": np.where(risk > np.quantile(risk, 0.8), "yes", "no")})
    frame.loc[rng.random(rows) < 0.05, "rating"] = np.nan
    frame.loc[rng.random(rows) < 0.03, "channel"] = None
    return frame


def tickets_table(rows: int = 240, seed: int = 5) -> pd.DataFrame:
    """Support tickets: free text (its wording carries most of the label, 5% of it empty), an order
    value with gaps, a channel category, an ID, and the target `urgency`."""
    rng = np.random.default_rng(seed)
    urgent = ["the site is down and customers cannot pay", "payment failed twice and I was charged",
              "outage since this morning, nothing loads", "my account was hacked, please lock it now"]
    routine = ["please update the billing address on my invoice", "how do I change my password",
               "could you send last month's receipt again", "a question about the delivery times"]
    praise = ["thanks, the new dashboard is lovely", "great support yesterday, all solved",
              "just wanted to say the app works well", "happy with the quick reply, cheers"]
    kind = rng.integers(0, 3, rows)
    openers = ["Hello,", "Hi team,", "Dear support,", ""]
    text = [f"{rng.choice(openers)} {rng.choice((urgent, routine, praise)[k])}. Order {rng.integers(1000, 9999)}."
            .strip() for k in kind]
    frame = pd.DataFrame({
        "ticket_id": [f"T-{index:05d}" for index in range(rows)],
        "message": text,
        "order_value": (rng.lognormal(4, 1, rows) + 40 * (kind == 0)).round(2),
        "channel": rng.choice(["email", "chat", "phone"], rows),
        "urgency": np.array(["high", "normal", "low"])[kind],
    })
    frame.loc[rng.random(rows) < 0.05, "message"] = None
    frame.loc[rng.random(rows) < 0.05, "order_value"] = np.nan
    return frame


def rare_table(rows: int = 3000, seed: int = 7) -> pd.DataFrame:
    """Card payments, ~4% of them fraud: weak signals in amount, hour, country, merchant and account
    age, so the likelier class is nearly always "no" and argmax all but never names a fraud."""
    rng = np.random.default_rng(seed)
    amount = rng.lognormal(3, 1.2, rows).round(2)
    hour = rng.integers(0, 24, rows)
    country = rng.choice(["US", "GB", "DE", "NG", "BR", "IN"], rows, p=[0.5, 0.15, 0.15, 0.05, 0.1, 0.05])
    merchant = rng.choice(["grocery", "travel", "electronics", "gaming", "fuel"], rows)
    age_days = rng.integers(1, 3000, rows)
    risk = (-4.4 + 0.9 * (np.log(amount) > 4.5) + 1.2 * (hour < 5) + 1.3 * (country == "NG")
            + 1.0 * (merchant == "gaming") + 0.8 * (age_days < 60) + rng.normal(0, 0.5, rows))
    fraud = rng.random(rows) < 1 / (1 + np.exp(-risk))
    return pd.DataFrame({"amount": amount, "hour": hour, "country": country, "merchant": merchant,
                         "account_age_days": age_days, "fraud": np.where(fraud, "yes", "no")})


def defects_table(rows: int = 4000, seed: int = 3) -> pd.DataFrame:
    """Parts inspected: six measurements and a site; 86% fine, 9.5% scratched, 4.5% cracked, each
    defect a weak linear signal in two measurements, so argmax rarely names one."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (rows, 6))
    logits = np.column_stack([np.zeros(rows), -2.6 + 0.9 * x[:, 0] + 0.6 * x[:, 1], -3.4 + 0.9 * x[:, 2] - 0.7 * x[:, 3]])
    chance = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    kind = (rng.random(rows)[:, None] > chance.cumsum(1)).sum(1)
    frame = pd.DataFrame(x.round(3), columns=[f"m{index}" for index in range(6)])
    frame["site"] = rng.choice(["a", "b", "c"], rows)
    frame["defect"] = np.array(["none", "scratch", "crack"])[kind]
    return frame


MESSY = {"churn": (churn_table, "churned"), "rare": (rare_table, "fraud"), "defects": (defects_table, "defect"), "tickets": (tickets_table, "urgency"), "loans": (loans_table, "defaulted"),
         "thresholds": (thresholds_table, "label"), "linear": (linear_table, "label"), "orders": (large_table, "returned"),
         "sparse": (sparse_table, "label")}


def write_messy(name: str, folder: Path) -> tuple[Path, str]:
    """The table as a CSV file (what a user hands `maas run`) and its target column."""
    make, target = MESSY[name]
    path = folder / f"{name}.csv"
    make().to_csv(path, index=False)
    return path, target


def written_as_a_bank_exports_it(frame: pd.DataFrame) -> pd.DataFrame:
    """The loans table as a spreadsheet export writes it: incomes as "$52,300" (2% "n/a"), amounts
    as "12.345,00 €" (decimal comma), application times as "03/14/2025 09:00 PM"."""
    written = frame.copy()
    rng = np.random.default_rng(3)
    written["income"] = [None if value != value else f"${value:,.0f}" for value in frame["income"]]
    written.loc[rng.random(len(frame)) < 0.02, "income"] = "n/a"
    written["amount"] = [f"{value:,.2f}".replace(",", " ").replace(".", ",").replace(" ", ".") + " €"
                         for value in frame["amount"]]
    written["applied_on"] = pd.to_datetime(frame["applied_on"]).dt.strftime("%m/%d/%Y %I:%M %p")
    return written


def write_builtin(name: str, folder: Path) -> tuple[Path, str]:
    """A scikit-learn built-in as the CSV file a user would have (target: 'target', its class names)."""
    from tasks.data import load_builtin

    table = load_builtin(name)
    path = folder / f"{name}.csv"
    table.frame.to_csv(path, index=False)
    return path, table.target
