"""Tenants: spend over time by model, provider and billing mode; budget burn; key routes and terms."""

import polars as pl
import streamlit as st

from dashboard import charts, figures, shell
from dashboard.shell import Context


def render(ctx: Context) -> None:
    st.title("Tenants")
    st.caption(shell.scope_label(ctx))
    if not shell.require_reports(ctx, "tenant_costs"):
        return
    rows = figures.scoped(ctx.frame("tenant_costs"), ctx.period, ctx.tenant)
    if ctx.tenant is None:
        st.subheader("Spend per tenant and billing mode")
        shell.show_table(_per_tenant(rows))
    else:
        _terms_and_routes(ctx)
    if rows.is_empty():
        st.info(f"No requests in {ctx.period} for {ctx.tenant or 'any tenant'}.")
    else:
        tabs = st.tabs(["By model", "By provider", "By billing mode"])
        for tab, dimension in zip(tabs, ("model", "provider", "billing_mode"), strict=True):
            with tab:
                st.altair_chart(charts.stacked_spend(figures.spend_by(rows, dimension), dimension,
                                                     f"Daily spend by {dimension.replace('_', ' ')}"), width="stretch")
    _budgets(ctx)


def _per_tenant(rows: pl.DataFrame) -> pl.DataFrame:
    def cost(mode: str) -> pl.Expr:  # no usage in this mode: 0; usage but none of it priced: unknown
        in_mode = pl.col("billing_mode") == mode
        known = pl.col("cost_usd").filter(in_mode)
        return pl.when(in_mode.any() & (known.count() == 0)).then(None).otherwise(known.sum())

    return (rows.group_by("tenant")
            .agg(requests=pl.col("requests").sum(), unified_usd=cost("unified"), byok_usd=cost("byok"),
                 total_usd=figures.known_cost())
            .sort("total_usd", descending=True, nulls_last=True))


def _terms_and_routes(ctx: Context) -> None:
    terms = ctx.policy.files.tenants.get(ctx.tenant)
    if terms is None:
        st.warning(f"`{ctx.tenant}` is not in `tenants.csv`: no markup or BYOK fee applies to it.")
    else:
        st.markdown(f"**{terms.name}** — unified billing markup **{terms.markup_pct}%**, "
                    f"fee on BYOK usage **{terms.byok_fee_pct}%**")
    keys = {k.key_id: k for k in ctx.control.keys}
    routes = [{"line": r.line, "models": r.model_glob, "keys": " → ".join(r.key_ids),
               "billing_mode": ", ".join(sorted({keys[k].billing_mode for k in r.key_ids if k in keys})) or "no key",
               "key_health": ", ".join(f"{k}: {keys[k].status}/{keys[k].health}" if k in keys else f"{k}: missing"
                                       for k in r.key_ids),
               "applies_to": "this tenant" if r.tenant == ctx.tenant else "every tenant (*)"}
              for r in ctx.policy.files.routes if r.tenant in (ctx.tenant, "*")]
    st.subheader("Key routes")
    st.caption("From `policy/routes.csv`, first match wins. BYOK: the tenant's own key, billed by the provider; "
               "unified: the operator's key, billed on the statement.")
    if routes:
        shell.show_table(pl.DataFrame(routes))
    else:
        st.info("No route in `policy/routes.csv` serves this tenant: its requests are refused (403).")


def _budgets(ctx: Context) -> None:
    st.subheader("Budget burn")
    if ctx.frame("budget_status") is None:
        st.info("No budget status in the reports yet; `tollway report run` builds it.")
        return
    burn = figures.budget_burn(ctx.frame("budget_status"), ctx.tenant)
    if burn.is_empty():
        st.info("No USD budget in `policy/limits.csv` applies " + (f"to {ctx.tenant}." if ctx.tenant else "."))
        return
    st.caption("Current windows only (budget status is built for now, whatever period is picked). The forecast "
               "extends the spend so far at the same rate to the window's end.")
    for row in burn.filter(pl.col("over_forecast")).iter_rows(named=True):
        st.warning(f"{row['tenant']}: the {row['window']} budget of {figures.money(row['limit_usd'])} is forecast to "
                   f"reach {figures.money(row['forecast_usd'])}.", icon=":material/trending_up:")
    shell.show_table(burn.with_columns(pl.col("percent").fill_null(0)),
                     percent=st.column_config.ProgressColumn(min_value=0, max_value=100, format="%.1f%%"))
    monthly = burn.filter((pl.col("window") == "month") & (pl.col("subject") == "tenant"))
    if ctx.tenant and not monthly.is_empty() and ctx.period == ctx.today.strftime("%Y-%m"):
        limit = float(monthly["limit_usd"][0])
        cumulative = figures.cumulative_spend(ctx.frame("tenant_costs"), ctx.period, ctx.tenant)
        st.altair_chart(charts.burn(cumulative, limit, "Spend so far this month against the monthly budget"),
                        width="stretch")


render(shell.context())
