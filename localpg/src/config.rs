//! Rendering the settings file and connection strings.

use crate::LocalPgError;

/// Quotes a value for a libpq / tokio-postgres `key=value` connection string.
pub fn quote_conninfo_value(value: &str) -> String {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:".contains(c))
    {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Renders `name = 'value'` lines for a postgresql.conf include file. Names must be
/// plain identifiers (letters, digits, `_` and `.` for extension settings); values are
/// always quoted, which PostgreSQL accepts for every setting type.
pub(crate) fn render_settings(settings: &[(String, String)]) -> Result<String, LocalPgError> {
    let mut out =
        String::from("# Written by umstore localpg on every start; edits here are overwritten.\n");
    for (name, value) in settings {
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !valid_name {
            return Err(LocalPgError::InvalidSetting {
                name: name.clone(),
                reason: "names may hold only letters, digits, '_' and '.'",
            });
        }
        if value.contains(['\n', '\r', '\0']) {
            return Err(LocalPgError::InvalidSetting {
                name: name.clone(),
                reason: "values may not contain line breaks or NUL",
            });
        }
        let escaped = value.replace('\\', "\\\\").replace('\'', "''");
        out.push_str(&format!("{name} = '{escaped}'\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_conninfo_values_stay_bare_and_others_are_quoted() {
        assert_eq!(quote_conninfo_value("/tmp/x-1"), "/tmp/x-1");
        assert_eq!(quote_conninfo_value(""), "''");
        assert_eq!(quote_conninfo_value("a b'c"), r"'a b\'c'");
    }

    #[test]
    fn settings_are_quoted_and_checked() {
        let text = render_settings(&[
            ("port".into(), "5433".into()),
            ("unix_socket_directories".into(), "/tmp/it's".into()),
        ])
        .unwrap();
        assert!(text.contains("port = '5433'\n"));
        assert!(text.contains("unix_socket_directories = '/tmp/it''s'\n"));
        assert!(render_settings(&[("bad name".into(), "x".into())]).is_err());
        assert!(render_settings(&[("x".into(), "a\nb".into())]).is_err());
    }
}
