//! Paging of ListVolumes: `max_entries` and opaque `starting_token`/`next_token`.
//!
//! Owns: the token format. A token names the last volume of the previous page (`v1:<name>`), so
//! paging is stable while volumes are created or deleted between calls: nothing is skipped or
//! repeated except volumes that really appeared or vanished.
//! Must not depend on: the storage node; it pages any list sorted by name.
//! Invariant: a token this module did not produce is refused with `ABORTED`, as the spec asks.

use ballast_common::validate_volume_name;

use crate::CsiError;

const TOKEN_PREFIX: &str = "v1:";

/// The token that continues after `last_name`.
pub fn encode_token(last_name: &str) -> String {
    format!("{TOKEN_PREFIX}{last_name}")
}

/// The name a token continues after; `None` for the empty token (first page).
pub fn decode_token(token: &str) -> Result<Option<&str>, CsiError> {
    if token.is_empty() {
        return Ok(None);
    }
    match token.strip_prefix(TOKEN_PREFIX) {
        Some(name) if validate_volume_name(name).is_ok() => Ok(Some(name)),
        _ => Err(CsiError::Aborted(format!(
            "starting_token {token:?} was not issued by this plugin"
        ))),
    }
}

/// One page of `items` (sorted here by `name_of`): at most `max_entries` items (0 = all) after
/// the token's name, and the token for the next page (empty on the last page).
pub fn page<T>(
    mut items: Vec<T>,
    name_of: impl Fn(&T) -> &str,
    max_entries: i32,
    starting_token: &str,
) -> Result<(Vec<T>, String), CsiError> {
    if max_entries < 0 {
        return Err(CsiError::InvalidArgument(format!(
            "max_entries {max_entries} is negative"
        )));
    }
    let after = decode_token(starting_token)?;
    items.sort_by(|left, right| name_of(left).cmp(name_of(right)));
    if let Some(after) = after {
        items.retain(|item| name_of(item) > after);
    }
    let limit = if max_entries == 0 {
        items.len()
    } else {
        max_entries as usize
    };
    if items.len() <= limit {
        return Ok((items, String::new()));
    }
    items.truncate(limit);
    let next_token = items
        .last()
        .map(|item| encode_token(name_of(item)))
        .unwrap_or_default();
    Ok((items, next_token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(count: usize) -> Vec<String> {
        (0..count)
            .rev()
            .map(|index| format!("v{index:02}"))
            .collect()
    }

    #[test]
    fn pages_cover_everything_once_in_order() {
        let mut seen = Vec::new();
        let mut token = String::new();
        for _ in 0..10 {
            let (page, next) = page(names(7), |name| name.as_str(), 3, &token).unwrap();
            seen.extend(page);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, (0..7).map(|i| format!("v{i:02}")).collect::<Vec<_>>());
    }

    #[test]
    fn zero_means_everything_and_exact_fit_has_no_token() {
        let (all, next) = page(names(5), |name| name.as_str(), 0, "").unwrap();
        assert_eq!((all.len(), next.as_str()), (5, ""));
        let (all, next) = page(names(5), |name| name.as_str(), 5, "").unwrap();
        assert_eq!((all.len(), next.as_str()), (5, ""));
    }

    #[test]
    fn paging_survives_deletion_of_the_token_volume() {
        let (_, token) = page(names(6), |name| name.as_str(), 2, "").unwrap();
        assert_eq!(token, "v1:v01");
        let remaining: Vec<String> = names(6).into_iter().filter(|n| n != "v01").collect();
        let (next_page, _) = page(remaining, |name| name.as_str(), 2, &token).unwrap();
        assert_eq!(next_page, ["v02", "v03"]);
    }

    #[test]
    fn bad_tokens_abort_and_negative_limits_are_invalid() {
        for token in ["invalid-token", "v1:", "v1:Bad_Name", "v2:abc"] {
            assert!(
                matches!(
                    page(names(2), |name| name.as_str(), 0, token),
                    Err(CsiError::Aborted(_))
                ),
                "{token}"
            );
        }
        assert!(matches!(
            page(names(2), |name| name.as_str(), -1, ""),
            Err(CsiError::InvalidArgument(_))
        ));
    }
}
