"""The dashboard's entrypoint (`tollway dashboard` runs it): page set-up, shared filters, navigation.

The deployment directory comes from `TOLLWAY_DATA_DIR`, which `tollway dashboard` sets.
"""

from pathlib import Path

import streamlit as st

from dashboard.shell import build_context

PAGES = Path(__file__).parent / "app_pages"

st.set_page_config(page_title="Tollway", page_icon=":material/toll:", layout="wide")
build_context()
st.navigation([
    st.Page(PAGES / "overview.py", title="Overview", icon=":material/monitoring:", default=True),
    st.Page(PAGES / "tenants.py", title="Tenants", icon=":material/domain:"),
    st.Page(PAGES / "billing.py", title="Billing", icon=":material/receipt_long:"),
    st.Page(PAGES / "users.py", title="Users", icon=":material/group:"),
    st.Page(PAGES / "policy.py", title="Policy", icon=":material/policy:"),
]).run()
