//! The VM harness itself: the guest has cachefiles in on-demand mode, runs the host's programs,
//! sees fixtures under the target directory, reports its script's exit status, and is killed at
//! its timeout.

use std::time::Duration;

use phoenixfs_tests::fixture_dir;
use phoenixfs_tests::vm::{Vm, GUEST_CACHE_DIR};

#[test]
fn vm_runs_host_programs_binds_cachefiles_reports_status_and_times_out() {
    let input = fixture_dir("vm-guest-input").join("greeting");
    std::fs::write(&input, "hello from the host").unwrap();

    // The hang runs beside the other two: it costs its whole timeout, mostly idle.
    let hang_timeout = Duration::from_secs(40);
    std::thread::scope(|scope| {
        let hang = scope.spawn(|| Vm { timeout: hang_timeout, ..Vm::default() }.run("echo hanging; sleep 1000"));

        let checks = format!(
            r#"set -e
test -c /dev/cachefiles
/usr/bin/python3 -c 'print("python says", 6 * 7)'
cat {input}; echo
exec 3<>/dev/cachefiles
printf 'dir {GUEST_CACHE_DIR}' >&3
printf 'bind ondemand' >&3
echo cachefiles bound"#,
            input = input.display()
        );
        let run = Vm::default().run(&checks);
        assert_eq!(run.exit_code, Some(0), "console:\n{}", run.console);
        for expected in ["python says 42", "hello from the host", "cachefiles bound"] {
            assert!(run.console.contains(expected), "{expected:?} not in the console:\n{}", run.console);
        }
        eprintln!("boot and checks took {:?}", run.elapsed);

        let failing = Vm::default().run("echo failing; exit 3");
        assert_eq!(failing.exit_code, Some(3), "console:\n{}", failing.console);
        assert!(!failing.timed_out);
        eprintln!("boot and `exit 3` took {:?}", failing.elapsed);

        let hang = hang.join().expect("hanging run");
        assert!(hang.timed_out, "console:\n{}", hang.console);
        assert_eq!(hang.exit_code, None);
        assert!(hang.console.contains("hanging"), "the script never started; console:\n{}", hang.console);
        assert!(hang.elapsed < hang_timeout + Duration::from_secs(10), "killed only after {:?}", hang.elapsed);
    });
}
