"""Monthly bills: per key, the tier's base price plus the rows past its included ones, from the usage
the service metered (deployments/metering.py; summed across workers and replicas in the store).

Usage is idempotent the way Stripe's meter events are: a request that carries its own X-Request-Id
is counted once per key however often it is retried (the store remembers billed ids), and a request
without one gets a fresh id, so it is counted once by construction. Money is Decimal, rounded half
up to the cent once per line: the same requests always make the same bill.
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal

from maas.config import TierConfig
from maas.errors import MaasInputError
from maas.service_store import month_bounds

CENT = Decimal("0.01")


@dataclass(frozen=True)
class Invoice:
    month: str
    key_id: str
    name: str
    tier: str
    currency: str
    requests: int
    rows: int
    included_rows: int
    billable_rows: int
    monthly_base: Decimal
    per_1k_rows: Decimal
    usage_charge: Decimal
    total: Decimal

    def as_json(self) -> dict:
        return {name: str(value) if isinstance(value, Decimal) else value for name, value in asdict(self).items()}


def billing_period(month: str) -> tuple[float, float]:
    """Epoch seconds of the month's first instant and of the next month's (UTC), from YYYY-MM."""
    try:
        return month_bounds(datetime.strptime(month, "%Y-%m").replace(tzinfo=timezone.utc))
    except ValueError:
        raise MaasInputError(f"--month '{month}': expected YYYY-MM, e.g. 2026-12") from None


def invoice(month: str, key: tuple[str, str, str], usage: tuple[int, int], tier: TierConfig) -> Invoice:
    """key: (id, name, tier name); usage: (requests, rows) of the month."""
    price = tier.price
    requests, rows = usage
    billable = max(0, rows - price.included_rows)
    charge = (Decimal(billable) * price.per_1k_rows / 1000).quantize(CENT, ROUND_HALF_UP)
    base = price.monthly_base.quantize(CENT, ROUND_HALF_UP)
    return Invoice(month, *key, price.currency, requests, rows, price.included_rows, billable, base,
                   price.per_1k_rows, charge, base + charge)


def monthly_invoices(connection, month: str, tiers: dict[str, TierConfig]) -> list[Invoice]:
    """An invoice for every key that was live in the month (created before its end, not revoked
    before its start) or that has usage in it."""
    start, end = billing_period(month)
    keys = connection.execute("SELECT key_id, name, tier FROM keys WHERE created_at < ? AND (revoked_at IS NULL "
                              "OR revoked_at >= ?) ORDER BY created_at", (end, start)).fetchall()
    used = {row[0]: (row[1], row[2]) for row in connection.execute(
        "SELECT key_id, requests, rows FROM usage WHERE month = ?", (month,))}
    known = {key_id for key_id, _, _ in keys}
    for key_id in sorted(set(used) - known):  # usage of a key since deleted, or the anonymous caller
        found = connection.execute("SELECT key_id, name, tier FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        if found:
            keys.append(found)
    invoices = []
    for key_id, name, tier_name in keys:
        if tier_name not in tiers:
            raise MaasInputError(f"key {key_id} ({name}) has tier '{tier_name}', which serving.tiers does not "
                                 f"price ({', '.join(tiers)}): pass the --config the service runs with")
        invoices.append(invoice(month, (key_id, name, tier_name), used.get(key_id, (0, 0)), tiers[tier_name]))
    return invoices


def invoices_csv(invoices: list[Invoice]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(Invoice.__dataclass_fields__))
    writer.writeheader()
    for line in invoices:
        writer.writerow(line.as_json())
    return out.getvalue()


def invoices_html(invoices: list[Invoice]) -> str:
    """One page, an invoice per key: what a customer would be sent."""
    sections = []
    for line in invoices:
        cells = [("Requests", line.requests), ("Rows", f"{line.rows:,}"), ("Included rows", f"{line.included_rows:,}"),
                 ("Billable rows", f"{line.billable_rows:,}"), ("Monthly base", f"{line.monthly_base} {line.currency}"),
                 (f"Usage ({line.per_1k_rows} per 1,000 rows)", f"{line.usage_charge} {line.currency}"),
                 ("Total", f"<b>{line.total} {line.currency}</b>")]
        rows = "".join(f"<tr><td>{html.escape(label)}</td><td>{value}</td></tr>" for label, value in cells)
        sections.append(f"<h2>{html.escape(line.name)} (key {line.key_id}, tier {html.escape(line.tier)})</h2>"
                        f"<table>{rows}</table>")
    month = invoices[0].month if invoices else ""
    return (f"<!doctype html><meta charset='utf-8'><title>maas invoices {month}</title><h1>Invoices {month}</h1>"
            + "".join(sections))
