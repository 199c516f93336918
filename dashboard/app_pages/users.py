"""Users: the largest spenders, by pseudonym only."""

import streamlit as st

from dashboard import charts, figures, shell
from dashboard.shell import Context

PSEUDONYMS = (
    "Users appear only as **pseudonyms**: a UUID the gateway derives from the tenant and the user id with a keyed "
    "hash (HMAC) under a secret of this deployment. The same user always gets the same pseudonym, so spend can "
    "be grouped, but the pseudonym cannot be turned back into a user id without that secret, and no user id, "
    "email, prompt or IP address is stored in the events or reports. To find out who a pseudonym is, an "
    "operator with access to the deployment must recompute it for a suspected user."
)


def render(ctx: Context) -> None:
    st.title("Top spenders")
    st.caption(shell.scope_label(ctx))
    st.info(PSEUDONYMS, icon=":material/visibility_off:")
    if not shell.require_reports(ctx, "user_costs"):
        return
    top = figures.top_spenders(ctx.frame("user_costs"), ctx.period, ctx.tenant,
                               st.slider("How many", 5, 100, 20, step=5))
    if top.is_empty():
        st.info(f"No user spend in {ctx.period} for {ctx.tenant or 'any tenant'}.")
        return
    st.altair_chart(charts.top_bars(figures.spender_bars(top), "Spend per user (first 8 characters of the "
                                    "pseudonym)"), width="stretch")
    shell.show_table(top)


render(shell.context())
