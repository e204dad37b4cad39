//! The effective configuration (`/config`), secrets shown only as their
//! references (`file:/etc/...`, `env:NAME`), and the reload button.
//!
//! Form: `POST /reload` (needs `config.reload` and an elevated session).

use maud::{html, Markup};

use super::{layout, Frame};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigView {
    /// The effective configuration as TOML; the handler renders secrets as
    /// references, never their values.
    pub effective: String,
    /// The file it was read from.
    pub source: String,
    /// The admin holds `config.reload`.
    pub can_reload: bool,
}

/// `GET /config`.
pub fn config(frame: &Frame, view: &ConfigView) -> Markup {
    let content = html! {
        @if !view.source.is_empty() {
            p { "Read from " code.wrap { (view.source) } ". Secrets are shown as references, never their values." }
        }
        @if view.can_reload {
            form.inline method="post" action="/reload" {
                button #reload type="submit" { "Reload configuration" }
            }
        }
        pre.config #config-effective tabindex="0" { (view.effective) }
    };
    layout(frame, "config", "Configuration", content)
}
