//! Human-readable byte sizes: parsing "512MiB", "10GiB", "1G", "4096" and printing "1.5 GiB".
//!
//! Must not depend on: anything but std; pure functions.
//! Invariant: parsing never overflows silently; too-large sizes are errors.
//! Units follow coreutils: bare K/M/G/T and KiB/MiB/GiB/TiB (and Ki/Mi/Gi/Ti) are powers of
//! 1024; KB/MB/GB/TB are powers of 1000. Units are case-insensitive; "B" alone means bytes.

/// Parses a size such as "512MiB", "1.5G", "10 GiB" or "4096" into bytes.
pub fn parse_size_bytes(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let unit_start = trimmed
        .find(|character: char| !(character.is_ascii_digit() || character == '.'))
        .unwrap_or(trimmed.len());
    let (number_text, unit_text) = trimmed.split_at(unit_start);
    if number_text.is_empty() {
        return Err(format!("size {text:?} does not start with a number"));
    }
    let multiplier: u64 = match unit_text.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        unit => return Err(format!("unknown size unit {unit:?} in {text:?}")),
    };
    let too_large = || format!("size {text:?} is too large");
    if let Ok(whole) = number_text.parse::<u64>() {
        return whole.checked_mul(multiplier).ok_or_else(too_large);
    }
    // A fraction such as "1.5G": exact enough for sizes, checked against the u64 range.
    let value: f64 = number_text
        .parse()
        .map_err(|_| format!("invalid number in size {text:?}"))?;
    let bytes = (value * multiplier as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(too_large());
    }
    Ok(bytes as u64)
}

/// Formats bytes with binary units, e.g. "0 B", "512 B", "1.5 GiB".
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit_index = 0;
    while value >= 1024.0 && unit_index + 1 < UNITS.len() {
        value /= 1024.0;
        unit_index += 1;
    }
    let formatted = format!("{value:.1}");
    let formatted = formatted.strip_suffix(".0").unwrap_or(&formatted);
    format!("{formatted} {}", UNITS[unit_index])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!(parse_size_bytes("4096"), Ok(4096));
        assert_eq!(parse_size_bytes("0"), Ok(0));
        assert_eq!(parse_size_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size_bytes("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_size_bytes("1g"), Ok(1 << 30));
        assert_eq!(parse_size_bytes("4Gi"), Ok(4 << 30));
        assert_eq!(parse_size_bytes("2k"), Ok(2048));
        assert_eq!(parse_size_bytes("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size_bytes("3MB"), Ok(3_000_000));
        assert_eq!(parse_size_bytes("100B"), Ok(100));
        assert_eq!(parse_size_bytes(" 10 GiB "), Ok(10 << 30));
        assert_eq!(parse_size_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size_bytes("0.5K"), Ok(512));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_size_bytes("").is_err());
        assert!(parse_size_bytes("GiB").is_err());
        assert!(parse_size_bytes("10XB").is_err());
        assert!(parse_size_bytes("-1G").is_err());
        assert!(parse_size_bytes("1.2.3G").is_err());
        assert!(parse_size_bytes("99999999999TiB").is_err());
        assert!(parse_size_bytes("18446744073709551615").is_ok());
        assert!(parse_size_bytes("18446744073709551616").is_err());
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(u64::MAX), "16 EiB");
    }
}
