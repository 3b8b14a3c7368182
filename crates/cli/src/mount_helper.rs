//! `mount -t fuse.phoenixfs IMAGE DIR -o store=…` and fstab lines of that type.
//!
//! mount(8) runs `/sbin/mount.fuse.phoenixfs IMAGE DIR [-sfnv] [-o OPTIONS]`; that name is a
//! link to the phoenixfs binary (the install step makes it), which turns the options into a
//! `phoenixfs mount` command line. Options are the mount's long flags, with `_` or `-`:
//! `store=URL` (again for mirrors), `cache=DIR`, `cache_size=10G`, `memory_cache=256M`,
//! `fetch_deadline=30s`, `readahead=16M`, `threads=N`, `passthrough=auto|on|off`, `passthrough_min=1M`, `passthrough_cache=2G`, `prefetch=LIST`, `prefetch_all`,
//! `fscache`, `domain=NAME`, `fscache_dir=DIR`. The options mount(8) and systemd add for
//! themselves (`defaults`, `noauto`, `nofail`, `_netdev`, `x-*`, `ro`/`rw`, `nosuid`, ...) are
//! accepted and have no effect (a phoenixfs mount is read-only, `nosuid`-free and `nodev`-free
//! as the image says). Anything else is an error in one line, unless mount(8) passes `-s`.

/// The file name mount(8) looks for.
pub const HELPER_NAME: &str = "mount.fuse.phoenixfs";

const WITH_VALUE: &[&str] = &["store", "cache", "cache-size", "memory-cache", "fetch-deadline", "readahead", "threads", "passthrough", "passthrough-min", "passthrough-cache", "prefetch", "domain", "fscache-dir"];
const FLAGS: &[&str] = &["prefetch-all", "fscache"];
const FOR_MOUNT_ITSELF: &[&str] = &[
    "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "nofail", "_netdev", "ro", "rw", "suid", "nosuid", "dev", "nodev", "exec",
    "noexec", "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime", "strictatime", "lazytime", "async", "sync", "silent", "loud",
];

/// What mount(8) asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum HelperCall {
    /// `-f`: pretend.
    Fake,
    /// The `phoenixfs` command line that mounts.
    Mount(Vec<String>),
}

/// The `phoenixfs mount` command line for mount(8)'s arguments (those after the program name).
pub fn command_line(args: &[String]) -> Result<HelperCall, String> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let (mut sloppy, mut fake, mut verbose) = (false, false, false);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-o" => options.extend(args.next().ok_or("-o without options")?.split(',').map(str::to_string)),
            "-t" | "-N" => {
                args.next().ok_or_else(|| format!("{arg} without a value"))?;
            }
            flags if flags.starts_with('-') && flags.len() > 1 => {
                for flag in flags[1..].chars() {
                    match flag {
                        's' => sloppy = true,
                        'f' => fake = true,
                        'v' => verbose = true,
                        'n' => {}
                        other => return Err(format!("unknown flag -{other}")),
                    }
                }
            }
            _ => positional.push(arg.clone()),
        }
    }
    let [image, mountpoint] = <[String; 2]>::try_from(positional).map_err(|p| format!("expected IMAGE and DIR, got {} arguments", p.len()))?;
    let mut line = vec!["phoenixfs".to_string()];
    if verbose {
        line.push("-v".into());
    }
    line.extend(["mount".to_string(), image, mountpoint]);
    for option in options.iter().filter(|o| !o.is_empty()) {
        let (key, value) = match option.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (option.as_str(), None),
        };
        let flag = key.replace('_', "-");
        match value {
            Some(value) if WITH_VALUE.contains(&flag.as_str()) => line.extend([format!("--{flag}"), value.to_string()]),
            None if FLAGS.contains(&flag.as_str()) => line.push(format!("--{flag}")),
            None if WITH_VALUE.contains(&flag.as_str()) => return Err(format!("mount option {key} needs a value ({key}=…)")),
            _ if FOR_MOUNT_ITSELF.contains(&key) || key.starts_with("x-") || key == "comment" => {}
            _ if sloppy => {}
            _ => {
                let known: Vec<String> = WITH_VALUE.iter().chain(FLAGS).map(|k| k.replace('-', "_")).collect();
                return Err(format!("unknown mount option {option:?} (phoenixfs knows {})", known.join(", ")));
            }
        }
    }
    Ok(if fake { HelperCall::Fake } else { HelperCall::Mount(line) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(args: &str) -> Result<HelperCall, String> {
        command_line(&args.split(' ').map(str::to_string).collect::<Vec<_>>())
    }

    fn mount(line: &str) -> HelperCall {
        HelperCall::Mount(line.split(' ').map(str::to_string).collect())
    }

    #[test]
    fn options_become_the_mount_commands_flags() {
        assert_eq!(
            call("abc /mnt/x -o rw,store=/srv/a,store=s3://b/p,cache_size=5G,prefetch_all,noauto,x-systemd.automount,nofail").unwrap(),
            mount("phoenixfs mount abc /mnt/x --store /srv/a --store s3://b/p --cache-size 5G --prefetch-all")
        );
        assert_eq!(call("img dir -n -v -o store=s").unwrap(), mount("phoenixfs -v mount img dir --store s"));
        assert_eq!(call("img dir -f -o store=s").unwrap(), HelperCall::Fake);
    }

    #[test]
    fn unknown_or_incomplete_options_are_one_clear_error() {
        let err = call("img dir -o store=s,colour=blue").unwrap_err();
        assert!(err.contains("\"colour=blue\"") && err.contains("store, cache"), "{err}");
        assert!(call("img dir -o store").unwrap_err().contains("needs a value"));
        assert!(call("img -o store=s").unwrap_err().contains("IMAGE and DIR"));
        assert_eq!(call("img dir -s -o store=s,colour=blue").unwrap(), mount("phoenixfs mount img dir --store s"));
    }
}
