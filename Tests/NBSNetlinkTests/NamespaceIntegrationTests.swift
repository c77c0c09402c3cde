import Foundation
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// End-to-end: the real monitor (inside the `nbs-netlink-probe` executable) in a fresh network
/// namespace, while the test changes links and addresses there with `ip`. Needs root.
@Suite(.serialized, .enabled("needs root and a working `ip netns`", { NamespaceSupport.unavailableReason == nil }))
struct NamespaceIntegrationTests {
    @Test func probeReportsLinkAndAddressChanges() async throws {
        let probePath = try #require(NamespaceSupport.probePath, "nbs-netlink-probe not built next to the test binary")
        let ns = try TestNamespace()
        defer { ns.delete() }
        try ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d0p")
        try ns.ip("link", "set", "d0p", "up")
        try ns.ip("link", "set", "lo", "up")

        let probe = try ProbeProcess(path: probePath, namespace: ns, arguments: ["--json"])
        defer { probe.stop() }
        try await probe.waitFor("interfaceUp lo")   // replayed state, after "ready"

        try ns.ip("link", "set", "d0", "up")
        try await probe.waitFor("interfaceUp d0")
        try ns.ip("addr", "add", "192.0.2.1/24", "dev", "d0")
        try await probe.waitFor("addressAdded 192.0.2.1")

        // With DAD (veth does it): reported once, when usable, never while tentative.
        try ns.ip("addr", "add", "2001:db8::1/64", "dev", "d0")
        try await probe.waitFor("addressAdded 2001:db8::1")
        let v6 = try #require(probe.lines().first { $0.brief == "addressAdded 2001:db8::1" })
        #expect(v6.flags.map { $0 & 0x40 == 0 } == true, "not tentative")
        #expect(v6.family == "inet6" && v6.prefixLength == 64 && v6.interfaceName == "d0")

        try ns.ip("link", "set", "d0", "down")
        try await probe.waitFor("interfaceDown d0", "addressRemoved 192.0.2.1", "addressRemoved 2001:db8::1")
        try ns.ip("link", "set", "d0", "up")
        // IPv4 addresses survive a down link, so 192.0.2.1 comes back; IPv6 ones were flushed.
        try await probe.waitFor("interfaceUp d0", "addressAdded 192.0.2.1", occurrence: 2)
        try ns.ip("addr", "del", "192.0.2.1/24", "dev", "d0")
        try await probe.waitFor("addressRemoved 192.0.2.1", occurrence: 2)
        try ns.ip("link", "del", "d0")
        try await probe.waitFor("interfaceRemoved d0", "interfaceRemoved d0p")

        let briefs = probe.lines().map(\.brief)
        #expect(briefs.first == "ready")
        let down = try #require(briefs.firstIndex(of: "interfaceDown d0"))
        let removed = try #require(briefs.firstIndex(of: "addressRemoved 192.0.2.1"))
        #expect(down < removed, "the link event comes first")
        #expect(!briefs.contains { $0.contains("fe80:") || $0.hasSuffix(" 127.0.0.1") || $0.hasSuffix(" ::1") },
                "loopback and link-local addresses are never announced")
        #expect(briefs.filter { $0 == "addressAdded 2001:db8::1" }.count == 1)
        #expect(probe.errors().isEmpty, "stderr: \(probe.errors())")
    }

    /// Freezes the probe so the kernel overruns its (tiny) receive queue, changes many addresses,
    /// and checks the re-dump reports exactly the difference.
    @Test func probeRecoversFromOverrunByRedumping() async throws {
        let probePath = try #require(NamespaceSupport.probePath, "nbs-netlink-probe not built next to the test binary")
        let ns = try TestNamespace()
        defer { ns.delete() }
        try ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d0p")
        try ns.ip("link", "set", "d0p", "up")
        try ns.ip("link", "set", "d0", "up")
        try ns.ip("addr", "add", "203.0.113.200/24", "dev", "d0")

        let probe = try ProbeProcess(path: probePath, namespace: ns, arguments: ["--json", "--debug", "--rcvbuf", "4096"])
        defer { probe.stop() }
        try await probe.waitFor("addressAdded 203.0.113.200")

        let count = 150
        let batch = FileManager.default.temporaryDirectory.appendingPathComponent("\(ns.name).batch")
        defer { try? FileManager.default.removeItem(at: batch) }
        let commands = (1...count).map { "address add 198.51.100.\($0)/32 dev d0" } + ["address del 203.0.113.200/24 dev d0"]
        try commands.joined(separator: "\n").appending("\n").write(to: batch, atomically: true, encoding: .utf8)

        kill(probe.pid, SIGSTOP)
        let resumed = Mutex(false)
        defer { if !resumed.withLock({ $0 }) { kill(probe.pid, SIGCONT) } }
        try ns.ip("-batch", batch.path)
        kill(probe.pid, SIGCONT)
        resumed.withLock { $0 = true }

        try await probe.waitFor("addressRemoved 203.0.113.200", timeout: .seconds(30))
        try await waitUntil(timeout: .seconds(30)) {
            probe.lines().filter { $0.event == "addressAdded" && $0.address?.hasPrefix("198.51.100.") == true }.count >= count
        }
        let added = probe.lines().filter { $0.event == "addressAdded" }.compactMap(\.address)
        #expect(added.count == Set(added).count, "each address reported once")
        #expect(Set(added) == Set((1...count).map { "198.51.100.\($0)" } + ["203.0.113.200"]))
        #expect(probe.errors().contains { $0.contains("overrun") }, "the queue really overflowed: \(probe.errors().suffix(5))")
    }
}

// MARK: - Harness

enum NamespaceSupport {
    static let ipPath: String? = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .first { FileManager.default.isExecutableFile(atPath: $0) }

    /// `nbs-netlink-probe` sits next to the test bundle in the build directory.
    static let probePath: String? = {
        if let path = ProcessInfo.processInfo.environment["NBS_NETLINK_PROBE"] { return path }
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        var dir = exe.deletingLastPathComponent()
        for _ in 0..<3 {
            let candidate = dir.appendingPathComponent("nbs-netlink-probe").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return nil
    }()

    static let unavailableReason: String? = {
        guard geteuid() == 0 else { return "not root" }
        guard let ip = ipPath else { return "no ip command" }
        let name = "nltest-\(getpid())-check"
        guard (try? run([ip, "netns", "add", name])) != nil else { return "ip netns add failed" }
        _ = try? run([ip, "netns", "del", name])
        return nil
    }()
}

struct CommandFailed: Error, CustomStringConvertible {
    var command: [String]
    var status: Int32
    var output: String
    var description: String { "\(command.joined(separator: " ")) exited \(status): \(output)" }
}

@discardableResult
func run(_ command: [String]) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: command[0])
    process.arguments = Array(command.dropFirst())
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    let output = String(decoding: data, as: UTF8.self)
    guard process.terminationStatus == 0 else {
        throw CommandFailed(command: command, status: process.terminationStatus, output: output)
    }
    return output
}

/// A namespace with a name unique to this process and test; `delete()` belongs in a `defer`.
struct TestNamespace: Sendable {
    let name: String
    let ipPath: String

    init() throws {
        ipPath = NamespaceSupport.ipPath ?? "ip"
        name = "nltest-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try run([ipPath, "netns", "add", name])
    }

    func ip(_ arguments: String...) throws {
        try run([ipPath, "-n", name] + arguments)
    }

    func delete() {
        _ = try? run([ipPath, "netns", "del", name])
    }
}

/// One line of `nbs-netlink-probe --json`.
struct ProbeLine: Decodable, Sendable {
    var event: String
    var name: String?
    var interfaceName: String?
    var address: String?
    var family: String?
    var prefixLength: Int?
    var flags: UInt32?

    var brief: String {
        switch event {
        case "addressAdded", "addressRemoved": "\(event) \(address ?? "?")"
        case "ready": event
        default: "\(event) \(name ?? "?")"
        }
    }
}

/// Reads a file descriptor on its own thread and keeps complete lines.
final class LineCollector: Sendable {
    private let state = Mutex<(lines: [String], done: Bool)>(([], false))

    /// Reads a duplicate of `pipe`, closed when its thread ends. The pipe's own descriptor is closed
    /// when its `Pipe` goes, and the number is handed out again at once, to a socket of a test running
    /// beside this one: a read already on its way then takes that socket's bytes. SwiftNIO, woken for
    /// them, finds nothing to read, which its debug build asserts against (`readable0`, `readResult ==
    /// .some`): that stopped one CI run's tests.
    init(fd pipe: Int32) {
        let fd = dup(pipe)
        Thread { [self] in
            guard fd >= 0 else { return }
            defer { Glibc.close(fd) }
            var pending: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 4096)
            while !state.withLock({ $0.done }) {
                var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&pfd, 1, 100) > 0 else { continue }
                let count = read(fd, &buffer, buffer.count)
                if count <= 0 { break }
                pending += buffer[0..<count]
                while let newline = pending.firstIndex(of: 10) {
                    let line = String(decoding: pending[..<newline], as: UTF8.self)
                    pending.removeSubrange(...newline)
                    state.withLock { $0.lines.append(line) }
                }
            }
        }.start()
    }

    var lines: [String] { state.withLock { $0.lines } }

    func close() { state.withLock { $0.done = true } }
}

/// `ip netns exec NS nbs-netlink-probe ...`; `ip` execs the probe, so the pid is the probe's.
final class ProbeProcess: Sendable {
    private let process: Process
    private let out: LineCollector
    private let err: LineCollector
    private let outPipe: Pipe
    private let errPipe: Pipe

    init(path: String, namespace: TestNamespace, arguments: [String]) throws {
        process = Process()
        process.executableURL = URL(fileURLWithPath: namespace.ipPath)
        process.arguments = ["netns", "exec", namespace.name, path] + arguments
        outPipe = Pipe()
        errPipe = Pipe()
        process.standardOutput = outPipe
        process.standardError = errPipe
        out = LineCollector(fd: outPipe.fileHandleForReading.fileDescriptor)
        err = LineCollector(fd: errPipe.fileHandleForReading.fileDescriptor)
        try process.run()
    }

    var pid: pid_t { process.processIdentifier }

    func lines() -> [ProbeLine] {
        out.lines.compactMap { try? JSONDecoder().decode(ProbeLine.self, from: Data($0.utf8)) }
    }

    func errors() -> [String] { err.lines }

    /// Waits until each brief ("addressAdded 192.0.2.1") has appeared `occurrence` times.
    func waitFor(_ briefs: String..., occurrence: Int = 1, timeout: Duration = .seconds(15),
                 sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let deadline = ContinuousClock.now + timeout
        while true {
            let seen = lines().map(\.brief)
            let missing = briefs.filter { brief in seen.filter { $0 == brief }.count < occurrence }
            if missing.isEmpty { return }
            if !process.isRunning || ContinuousClock.now > deadline {
                Issue.record("probe did not report \(missing) (x\(occurrence)); it printed:\n\(out.lines.joined(separator: "\n"))\nstderr:\n\(err.lines.joined(separator: "\n"))",
                             sourceLocation: sourceLocation)
                throw CancellationError()
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGCONT)
            process.terminate()
            process.waitUntilExit()
        }
        out.close()
        err.close()
    }
}
