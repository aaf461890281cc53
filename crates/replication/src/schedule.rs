//! Schedules in cron's five fields (minute, hour, day of month, month, day of week; UTC):
//! `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, and lists of those. As in cron,
//! when both day fields are restricted a day matching either is taken.

use crate::ReplicationError;

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    text: String,
    /// Allowed values per field, as bit sets.
    fields: [u64; 5],
    /// Whether day of month and day of week were `*`.
    any_day_of_month: bool,
    any_day_of_week: bool,
}

const RANGES: [(u32, u32); 5] = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];

impl Schedule {
    /// Parses five fields.
    pub fn parse(text: &str) -> Result<Schedule, ReplicationError> {
        let invalid = |why: &str| ReplicationError::Invalid(format!("schedule {text:?}: {why}"));
        if text.len() > 128 {
            return Err(invalid("too long"));
        }
        let parts: Vec<&str> = text.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(invalid(
                "five fields: minute hour day-of-month month day-of-week",
            ));
        }
        let mut fields = [0u64; 5];
        for (i, part) in parts.iter().enumerate() {
            let (low, high) = RANGES[i];
            for item in part.split(',') {
                let (range, step) = match item.split_once('/') {
                    Some((range, step)) => (
                        range,
                        step.parse::<u32>()
                            .ok()
                            .filter(|s| *s > 0)
                            .ok_or_else(|| invalid("a step is a positive number"))?,
                    ),
                    None => (item, 1),
                };
                let (from, to) = if range == "*" {
                    (low, high)
                } else if let Some((a, b)) = range.split_once('-') {
                    let a = a
                        .parse::<u32>()
                        .map_err(|_| invalid("a range is two numbers"))?;
                    let b = b
                        .parse::<u32>()
                        .map_err(|_| invalid("a range is two numbers"))?;
                    (a, b)
                } else {
                    let n = range.parse::<u32>().map_err(|_| invalid("not a number"))?;
                    (n, if step > 1 { high } else { n })
                };
                if from < low || to > high || from > to {
                    return Err(invalid(&format!("field {} takes {low} to {high}", i + 1)));
                }
                for value in (from..=to).step_by(step as usize) {
                    fields[i] |= 1 << value;
                }
            }
        }
        // Sunday is 0 or 7.
        if fields[4] & (1 << 7) != 0 {
            fields[4] |= 1;
        }
        Ok(Schedule {
            text: parts.join(" "),
            fields,
            any_day_of_month: parts[2] == "*",
            any_day_of_week: parts[4] == "*",
        })
    }

    /// The schedule as written (spaces normalised).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the minute holding `ms` (since the epoch) is one the schedule names.
    pub fn due_at(&self, ms: i64) -> bool {
        let c = berth_oci::time::civil(ms);
        let has = |field: usize, value: i64| self.fields[field] & (1 << value) != 0;
        let day_of_month = has(2, c.day);
        let day_of_week = has(4, c.weekday);
        let day = match (self.any_day_of_month, self.any_day_of_week) {
            (false, false) => day_of_month || day_of_week,
            _ => day_of_month && day_of_week,
        };
        has(0, c.minute) && has(1, c.hour) && has(3, c.month) && day
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_name_the_minutes_cron_would() {
        // 2026-11-22T18:42:49Z, a Sunday.
        let at = 1_795_372_969_000;
        let due = |text: &str| Schedule::parse(text).unwrap().due_at(at);
        assert!(due("* * * * *"));
        assert!(due("42 18 * * *"));
        assert!(!due("41 18 * * *"));
        assert!(due("*/6 * * * *"));
        assert!(!due("*/5 * * * *"));
        assert!(due("40-45 18 22 11 0"));
        assert!(!due("0 0 * * 7"));
        assert!(due("42 18 * * 7"));
        assert!(due("42 18 1 * 0"), "either day field matches");
        assert!(!due("42 18 1 * 1"));
        for bad in [
            "* * * *",
            "60 * * * *",
            "a * * * *",
            "*/0 * * * *",
            "5-1 * * * *",
            "* * 0 * *",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }
}
