//! postgrest-ws direct channels (`PGWS_DIRECT_CHANNELS`): which channels a gateway serves as
//! direct channels, and which channels the leader bridge agrees to LISTEN on when a gateway
//! reports one (so that a gateway's NATS credentials cannot make it LISTEN anywhere else).

/// Which channels are direct (`PGWS_DIRECT_CHANNELS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DirectChannels {
    /// None: every channel is postgres-websockets (the default).
    #[default]
    None,
    /// These channels.
    Some(std::collections::HashSet<String>),
    /// `*`: every channel.
    All,
}

impl DirectChannels {
    /// Parses a comma list of channel names, or `*`.
    pub fn parse(text: &str) -> Self {
        let names: std::collections::HashSet<String> = text
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        if names.contains("*") {
            Self::All
        } else if names.is_empty() {
            Self::None
        } else {
            Self::Some(names)
        }
    }

    /// Whether `channel` is served directly.
    pub fn contains(&self, channel: &str) -> bool {
        match self {
            Self::None => false,
            Self::Some(names) => names.contains(channel),
            Self::All => true,
        }
    }

    /// The listed names (none for `*`).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let names = match self {
            Self::Some(names) => Some(names.iter().map(String::as_str)),
            _ => None,
        };
        names.into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_is_a_list_or_a_star() {
        assert_eq!(DirectChannels::parse(""), DirectChannels::None);
        let some = DirectChannels::parse("chat, news ,");
        assert!(some.contains("chat") && some.contains("news") && !some.contains("x"));
        assert!(DirectChannels::parse("a,*").contains("anything"));
        assert!(!DirectChannels::None.contains("chat"));
    }
}
