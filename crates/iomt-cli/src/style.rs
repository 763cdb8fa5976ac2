//! Terminal styling for text output.

use std::io::IsTerminal;

use anstyle::{AnsiColor, Style};

use crate::ColorChoice;

/// The styles text output uses; all plain when colour is off.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Palette {
    pub(crate) ok: Style,
    pub(crate) bad: Style,
    pub(crate) hint: Style,
    pub(crate) dim: Style,
    pub(crate) heading: Style,
}

impl Palette {
    pub(crate) fn new(choice: ColorChoice) -> Self {
        let on = match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        };
        if !on {
            let plain = Style::new();
            return Self {
                ok: plain,
                bad: plain,
                hint: plain,
                dim: plain,
                heading: plain,
            };
        }
        Self {
            ok: Style::new().fg_color(Some(AnsiColor::Green.into())).bold(),
            bad: Style::new().fg_color(Some(AnsiColor::Red.into())).bold(),
            hint: Style::new().fg_color(Some(AnsiColor::Yellow.into())),
            dim: Style::new().dimmed(),
            heading: Style::new().bold(),
        }
    }
}

/// Wraps `text` in `style`.
pub(crate) fn paint(style: Style, text: impl std::fmt::Display) -> String {
    format!("{style}{text}{style:#}")
}
