//! Value normalization: emails trimmed and lower-cased, phones to E.164, LinkedIn URLs to
//! `linkedin.com/in/<slug>`, and full names split when first and last names are absent.

use rlibphonenumber::{PhoneNumberFormat, Region, PHONE_NUMBER_UTIL};

/// An ISO 3166-1 code (`US`, `gb`) of a region phone numbers are known for: not `ZZ`
/// ("unknown") or `001` ("world"), which parse as codes but number nothing.
pub fn parse_region(code: &str) -> Option<Region> {
    let region: Region = code.trim().to_ascii_uppercase().parse().ok()?;
    PHONE_NUMBER_UTIL
        .get_country_code_for_region(region)
        .map(|_| region)
}

pub fn email(raw: &str) -> Option<String> {
    let value = raw.trim();
    let value = value
        .strip_prefix("mailto:")
        .or_else(|| value.strip_prefix("MAILTO:"))
        .unwrap_or(value)
        .to_lowercase();
    email_address::EmailAddress::parse_with_options(&value, email_address::Options::default())
        .ok()
        // A domain without a dot ("ann@localhost") is valid RFC 5322 but never a contact's address.
        .filter(|addr| addr.domain().contains('.') && !addr.domain().ends_with('.'))
        .map(|_| value)
}

/// E.164, reading national numbers in `region`.
pub fn phone(raw: &str, region: Region) -> Option<String> {
    let value = raw.trim();
    if value.chars().filter(char::is_ascii_digit).count() < 5 {
        return None;
    }
    let number = PHONE_NUMBER_UTIL.parse(value, Some(region)).ok()?;
    if !PHONE_NUMBER_UTIL.is_valid_number(&number) {
        return None;
    }
    Some(
        PHONE_NUMBER_UTIL
            .format(&number, PhoneNumberFormat::E164)
            .into_owned(),
    )
}

/// `https://www.linkedin.com/in/Ann-Lee/?trk=x` → `linkedin.com/in/ann-lee`.
pub fn linkedin_url(raw: &str) -> Option<String> {
    let value = raw.trim();
    if value.is_empty() {
        return None;
    }
    let with_scheme = if value.contains("://") {
        value.to_owned()
    } else {
        format!("https://{value}")
    };
    let url = url::Url::parse(&with_scheme).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let host = url.host_str()?.to_ascii_lowercase();
    if host != "linkedin.com" && !host.ends_with(".linkedin.com") {
        return None;
    }
    let mut segments = url.path_segments()?.filter(|s| !s.is_empty());
    if segments.next()? != "in" {
        return None;
    }
    let slug = segments.next()?;
    let valid = slug
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '%'));
    if !valid || segments.next().is_some() {
        return None;
    }
    Some(format!("linkedin.com/in/{}", slug.to_ascii_lowercase()))
}

/// Runs of whitespace become one space and the ends are trimmed; most values need neither,
/// and are copied as they are.
pub fn fold_spaces(value: &str) -> String {
    let mut previous_space = false;
    let clean = value.chars().all(|c| {
        let ok = (c == ' ' && !previous_space) || !c.is_whitespace();
        previous_space = c == ' ';
        ok
    });
    if clean && !value.starts_with(' ') && !value.ends_with(' ') {
        value.to_owned()
    } else {
        value.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// Splits "Ann Marie Lee" into ("Ann Marie", "Lee"), and "Lee, Ann" into ("Ann", "Lee").
pub fn split_full_name(full: &str) -> (Option<String>, Option<String>) {
    let full = fold_spaces(full);
    if let Some((last, first)) = full.split_once(',') {
        let (first, last) = (first.trim(), last.trim());
        return (
            (!first.is_empty()).then(|| first.to_owned()),
            (!last.is_empty()).then(|| last.to_owned()),
        );
    }
    match full.rsplit_once(' ') {
        Some((first, last)) => (Some(first.to_owned()), Some(last.to_owned())),
        None if full.is_empty() => (None, None),
        None => (Some(full), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(
            email("  Ann.Lee@Example.COM "),
            Some("ann.lee@example.com".into())
        );
        assert_eq!(
            email("mailto:ann@example.com"),
            Some("ann@example.com".into())
        );
        assert_eq!(email("ann@"), None);
        assert_eq!(email("ann.example.com"), None);
        assert_eq!(email("ann@localhost"), None);
        assert_eq!(email(""), None);
    }

    #[test]
    fn phones_become_e164() {
        let us = parse_region("us").unwrap();
        assert_eq!(phone("(415) 555-2671", us), Some("+14155552671".into()));
        assert_eq!(phone("+44 20 7946 0958", us), Some("+442079460958".into()));
        let gb = parse_region("GB").unwrap();
        assert_eq!(phone("020 7946 0958", gb), Some("+442079460958".into()));
        assert_eq!(phone("12", us), None);
        assert_eq!(phone("not a phone", us), None);
        assert_eq!(phone("+1 000 000 0000", us), None);
    }

    #[test]
    fn regions_are_iso_codes() {
        assert!(parse_region("DE").is_some());
        assert!(parse_region("Germany").is_none());
        assert!(parse_region("ZZ").is_none());
        assert!(parse_region("001").is_none());
    }

    #[test]
    fn linkedin_urls_become_canonical() {
        for raw in [
            "https://www.linkedin.com/in/Ann-Lee/",
            "http://uk.linkedin.com/in/ann-lee?trk=profile",
            "linkedin.com/in/ann-lee",
            "www.linkedin.com/in/ann-lee/",
        ] {
            assert_eq!(
                linkedin_url(raw),
                Some("linkedin.com/in/ann-lee".into()),
                "{raw}"
            );
        }
        assert_eq!(linkedin_url("https://example.com/in/ann"), None);
        assert_eq!(linkedin_url("https://linkedin.com/company/acme"), None);
        assert_eq!(linkedin_url("https://linkedin.com/in/"), None);
        assert_eq!(linkedin_url("ann-lee"), None);
        assert_eq!(linkedin_url("ftp://linkedin.com/in/ann"), None);
    }

    #[test]
    fn full_names_split_on_the_last_space_or_a_comma() {
        assert_eq!(
            split_full_name("Ann Marie  Lee"),
            (Some("Ann Marie".into()), Some("Lee".into()))
        );
        assert_eq!(
            split_full_name("Lee, Ann"),
            (Some("Ann".into()), Some("Lee".into()))
        );
        assert_eq!(split_full_name("Cher"), (Some("Cher".into()), None));
        assert_eq!(split_full_name("  "), (None, None));
    }
}
