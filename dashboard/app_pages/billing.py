"""Billing: unified-billing statements per period and tenant, as CSV too; credit balances."""

import polars as pl
import streamlit as st

from analytics.csv_safety import write_csv
from dashboard import figures
from dashboard.shell import Context, context, for_display, money_columns, require_reports, scope_label

MONEY = ("unified_cost_usd", "markup_usd", "byok_cost_usd", "byok_fee_usd", "adjustments_usd", "charges_usd",
         "credits_opening_usd", "credits_added_usd", "credits_applied_usd", "credits_closing_usd", "amount_due_usd")


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
        st.dataframe(for_display(statements), hide_index=True,
                     column_config={**money_columns(*MONEY),
                                    "closed": st.column_config.CheckboxColumn("closed", help="frozen by "
                                                                              "`tollway report close`")})
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
        st.dataframe(for_display(balances), hide_index=True,
                     column_config=money_columns("credits_closing_usd", "amount_due_usd"))
    ledger = ctx.control.credits
    if ctx.tenant:
        ledger = ledger.filter(pl.col("tenant") == ctx.tenant)
    with st.expander(f"Top-ups ({ledger.height})"):
        st.caption("Added with `tollway credits add --tenant T --amount USD`.")
        st.dataframe(ledger, hide_index=True)


render(context())
