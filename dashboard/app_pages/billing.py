"""Billing: unified-billing statements per period and tenant, as CSV too; credit balances."""

import polars as pl
import streamlit as st

from analytics.csv_safety import write_csv
from dashboard import figures
from dashboard.shell import Context, context, require_reports, scope_label, show_table


def render(ctx: Context) -> None:
    st.title("Billing")
    st.caption(scope_label(ctx))
    if not require_reports(ctx, "statements"):
        return
    every_period = st.toggle("Every period", help="Show the statements of all periods, not only the one picked.")
    statements = figures.scoped(ctx.frame("statements"), None if every_period else ctx.period, ctx.tenant)
    if statements.is_empty():
        st.info(f"No statement for {ctx.tenant or 'any tenant'} in {ctx.period}.")
    else:
        _totals(statements)
        show_table(statements, closed=st.column_config.CheckboxColumn(help="frozen by `tollway report close`"))
        open_periods = sorted(set(statements.filter(~pl.col("closed"))["period"].to_list()))
        if open_periods:
            st.caption(f"Open period(s) {', '.join(open_periods)}: figures change until "
                       "`tollway report close --period YYYY-MM` freezes them; later events then become "
                       "adjustments in the next open period.")
        name = f"statements-{'all' if every_period else ctx.period}-{ctx.tenant or 'all-tenants'}.csv"
        st.download_button("Download these statements (CSV)", write_csv(statements), file_name=name,
                           mime="text/csv", icon=":material/download:")
    _credits(ctx)


def _totals(statements: pl.DataFrame) -> None:
    charges, credits, due = st.columns(3)
    charges.metric("Charges", figures.money(figures.known_sum(statements, "charges_usd")))
    credits.metric("Credits applied", figures.money(figures.known_sum(statements, "credits_applied_usd")))
    due.metric("Amount due", figures.money(figures.known_sum(statements, "amount_due_usd")))


def _credits(ctx: Context) -> None:
    st.subheader("Prepaid credits")
    balances = figures.credit_balances(ctx.frame("statements"), ctx.tenant)
    if balances.is_empty():
        st.info("No statements yet, so no balance.")
    else:
        st.caption("Balance at the close of each tenant's latest statement.")
        show_table(balances)
    ledger = ctx.control.credits
    if ctx.tenant:
        ledger = ledger.filter(pl.col("tenant") == ctx.tenant)
    with st.expander(f"Top-ups ({ledger.height})"):
        st.caption("Added with `tollway credits add --tenant T --amount USD`.")
        show_table(ledger)


render(context())
