import Foundation
import NIOCore
import NIOPosix
import Testing

@testable import nbs_mobility

/// The built `nbs-mobility`, next to the test bundle.
func cliBinary() -> URL {
    URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("nbs-mobility")
}

/// A running `nbs-mobility`, its output collected as it goes.
final class CLIProcess: @unchecked Sendable {
    let process = Process()
    private let out = Pipe()
    private let err = Pipe()
    private let stdoutTask: Task<Data, Never>
    private let stderrTask: Task<Data, Never>

    init(_ arguments: [String], stdin: Any? = nil, controlDirectory: String? = nil) throws {
        process.executableURL = cliBinary()
        process.arguments = arguments
        var environment = ProcessInfo.processInfo.environment
        environment["NBS_LOG_LEVEL"] = "warning"
        if let controlDirectory { environment["NBS_CONTROL_DIR"] = controlDirectory }
        process.environment = environment
        process.standardInput = stdin ?? FileHandle.nullDevice
        process.standardOutput = out
        process.standardError = err
        let outHandle = out.fileHandleForReading, errHandle = err.fileHandleForReading
        stdoutTask = Task { await readToEnd(outHandle) }
        stderrTask = Task { await readToEnd(errHandle) }
        try process.run()
    }

    /// Waits for the exit, killing the process after `seconds` so a hang fails the test.
    func finish(within seconds: Double = 60) async -> (status: Int32, stdout: Data, stderr: String) {
        let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        while process.isRunning, ContinuousClock.now < deadline { try? await Task.sleep(for: .milliseconds(20)) }
        if process.isRunning { process.terminate() }
        while process.isRunning { try? await Task.sleep(for: .milliseconds(20)) }
        return (process.terminationStatus, await stdoutTask.value, String(decoding: await stderrTask.value, as: UTF8.self))
    }

    func stop() async {
        if process.isRunning { process.terminate() }
        _ = await finish(within: 5)
    }
}

/// A blocking read on its own thread: blocking the few threads of Swift's cooperative pool with
/// several processes' pipes would deadlock the tests.
func readToEnd(_ handle: FileHandle) async -> Data {
    await withCheckedContinuation { continuation in
        Thread.detachNewThread { continuation.resume(returning: handle.readDataToEndOfFile()) }
    }
}

func runCLI(_ arguments: [String], stdin: Any? = nil, controlDirectory: String? = nil, within seconds: Double = 60) async throws -> (status: Int32, stdout: String, stderr: String) {
    let result = try await CLIProcess(arguments, stdin: stdin, controlDirectory: controlDirectory).finish(within: seconds)
    return (result.status, String(decoding: result.stdout, as: UTF8.self), result.stderr)
}

/// A port nothing uses right now, below Linux's ephemeral range (32768 and up): a port the kernel
/// picked could be handed out again as the source port of some other test's connection before the
/// CLI binds it, and the CLI's listen then fails with "address in use" (seen once in a full run).
func freePort() async throws -> Int {
    for _ in 0..<100 {
        let port = Int.random(in: 20_000..<32_768)
        guard let channel = try? await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "127.0.0.1", port: port).get() else { continue }
        try await channel.close()
        return port
    }
    throw NoFreePort()
}

struct NoFreePort: Error {}

/// Waits until a socket listens on the port, as the kernel's tables show it: neither a probe
/// connection (to an NBS listener it would be a legacy client) nor a probe bind (it could take the
/// port from the server starting up) would leave the server alone.
func waitListening(_ port: Int, seconds: Double = 20) async throws {
    let hexPort = String(format: ":%04X", port)
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < deadline {
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let lines = (try? String(contentsOfFile: table, encoding: .utf8))?.split(separator: "\n") ?? []
            // Fields: sl local_address rem_address st ...; st 0A is LISTEN.
            if lines.contains(where: { line in
                let fields = line.split(separator: " ")
                return fields.count > 3 && fields[1].hasSuffix(hexPort) && fields[3] == "0A"
            }) { return }
        }
        try await Task.sleep(for: .milliseconds(50))
    }
    Issue.record("nothing listened on port \(port) within \(seconds) s")
}

func temporaryDirectory() throws -> String {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("nbs-cli-\(UUID().uuidString.prefix(8))").path
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o700])
    return path
}

func randomFile(_ bytes: Int, in directory: String, name: String) throws -> URL {
    var generator = PatternGenerator()
    let url = URL(fileURLWithPath: directory).appendingPathComponent(name)
    try Data(generator.next(bytes).readableBytesView).write(to: url)
    return url
}

/// The binary itself on loopback: what a user sees for each mistake, and cat and status working.
@Suite(.serialized) struct CLIBinaryTests {
    @Test func nothingListeningOnThePort() async throws {
        let port = try await freePort()
        let run = try await runCLI(["connect", "--name", "client.test", "localhost:\(port)", "--bytes", "1", "--no-control"])
        #expect(run.status == 1)
        #expect(run.stderr.contains("cannot reach 'localhost'"))
        #expect(run.stderr.contains("hint: is `nbs-mobility serve`"))
    }

    @Test func aNameTheListenerDoesNotServe() async throws {
        let port = try await freePort()
        let server = try CLIProcess(["serve", "--name", "alpha.test", "--port", "\(port)", "--sink", "--no-control", "--view", "off"])
        try await waitListening(port)
        let run = try await runCLI(["connect", "--name", "client.test", "localhost:\(port)", "--bytes", "1", "--no-control"])
        await server.stop()
        #expect(run.status == 1)
        #expect(run.stderr.contains("refused"))
        #expect(run.stderr.contains("hint: the listener on that port serves another name"))
    }

    @Test func aPortAlreadyInUse() async throws {
        let holder = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: "::", port: 0).get()
        let port = holder.localAddress!.port!
        let run = try await runCLI(["serve", "--name", "s.test", "--port", "\(port)", "--sink", "--no-control"])
        try await holder.close()
        #expect(run.status == 1)
        #expect(run.stderr.contains("in use"))
        #expect(run.stderr.contains("hint: another process listens on port \(port)"))
    }

    @Test func badNamesAndBadArguments() async throws {
        let name = try await runCLI(["connect", "--name", "two words", "localhost:9", "--bytes", "1", "--no-control"])
        #expect(name.status == 1)
        #expect(name.stderr.contains("invalid name 'two words'"))
        #expect(name.stderr.contains("hint:"))
        let port = try await runCLI(["connect", "--name", "c.test", "localhost:99999", "--bytes", "1"])
        #expect(port.status == 64) // EX_USAGE, from the argument parser
        #expect(port.stderr.contains("port in 1...65535"))
    }

    /// netcat by name, both directions at once, through pipes and files.
    @Test func catCarriesBothDirections() async throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let toClient = try randomFile(3 << 20, in: dir, name: "a")
        let toServer = try randomFile(5 << 20 + 7, in: dir, name: "b")
        let port = try await freePort()
        let listener = try CLIProcess(["cat", "--listen", "--name", "localhost", "--port", "\(port)", "--local", "127.0.0.1", "--local", "::1"],
                                      stdin: try FileHandle(forReadingFrom: toClient), controlDirectory: dir)
        try await waitListening(port)
        let client = try CLIProcess(["cat", "--name", "client.test", "localhost:\(port)", "--json"],
                                    stdin: try FileHandle(forReadingFrom: toServer), controlDirectory: dir)
        let (clientResult, listenerResult) = await (client.finish(), listener.finish())
        #expect(clientResult.status == 0, "\(clientResult.stderr)")
        #expect(listenerResult.status == 0, "\(listenerResult.stderr)")
        #expect(clientResult.stdout == (try Data(contentsOf: toClient)))
        #expect(listenerResult.stdout == (try Data(contentsOf: toServer)))
        // --json: the report on stderr, stdout stays the peer's bytes only.
        let report = try #require(clientResult.stderr.split(separator: "\n").last.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] })
        #expect(report["sent_bytes"] as? Int == 5 << 20 + 7)
        #expect(report["bytes"] as? Int == 3 << 20)
        #expect(report["completed"] as? Bool == true)
    }

    /// `serve --timeline`: every received byte lands in one 100 ms bin of the file bench.sh plots.
    @Test func serveWritesItsReceiveTimeline() async throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/timeline"
        let port = try await freePort()
        let server = try CLIProcess(["serve", "--name", "localhost", "--port", "\(port)", "--sink", "--once", "--view", "off", "--timeline", file],
                                    controlDirectory: dir)
        try await waitListening(port)
        let client = try CLIProcess(["connect", "--name", "client.test", "localhost:\(port)", "--bytes", "3M", "--view", "off"], controlDirectory: dir)
        let (c, s) = await (client.finish(), server.finish())
        #expect(c.status == 0 && s.status == 0, "\(c.stderr) \(s.stderr)")
        let rows = try String(contentsOfFile: file, encoding: .utf8).split(separator: "\n").map { $0.split(separator: " ").compactMap { Int($0) } }
        #expect(!rows.isEmpty)
        #expect(rows.allSatisfy { $0.count == 2 })
        #expect(rows.enumerated().allSatisfy { $0.element.first == $0.offset * 100 })
        #expect(rows.reduce(0) { $0 + ($1.last ?? 0) } == 3 << 20)
    }

    /// `status` sees the running processes' sessions and subflows, and they clean up after themselves.
    @Test func statusShowsRunningSessions() async throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = try await freePort()
        let server = try CLIProcess(["serve", "--name", "localhost", "--port", "\(port)", "--sink", "--once", "--view", "off"], controlDirectory: dir)
        try await waitListening(port)
        let client = try CLIProcess(["connect", "--name", "client.test", "localhost:\(port)", "--duration", "4", "--view", "off",
                                     "--local", "127.0.0.1", "--local", "127.0.0.2"], controlDirectory: dir)
        var seen: [ProcessStatus] = []
        let deadline = ContinuousClock.now + .seconds(3)
        while ContinuousClock.now < deadline {
            let run = try await runCLI(["status", "--json"], controlDirectory: dir, within: 10)
            seen = run.stdout.split(separator: "\n").compactMap { try? JSONDecoder.snakeCase.decode(ProcessStatus.self, from: Data($0.utf8)) }
            if seen.count == 2, seen.allSatisfy({ $0.sessions.first?.subflows.map(\.view).sorted() == ["active", "standby"] }) { break }
            try await Task.sleep(for: .milliseconds(200))
        }
        #expect(Set(seen.map(\.command)) == ["serve", "connect"])
        for process in seen {
            let session = try #require(process.sessions.first)
            // Both subflows run over lo, between the same two interfaces: one carries, one stands by.
            #expect(session.subflows.map(\.view).sorted() == ["active", "standby"], "\(process.command): \(session.subflows)")
            #expect(session.bytesDone > 0)
        }
        let text = try await runCLI(["status"], controlDirectory: dir, within: 10)
        #expect(text.stdout.contains("localhost <- client.test"))
        #expect(text.stdout.contains(LiveViewRenderer.columns))
        let (c, s) = await (client.finish(), server.finish())
        #expect(c.status == 0 && s.status == 0, "\(c.stderr) \(s.stderr)")
        #expect(ControlDirectory.sockets(in: dir).isEmpty)
    }

    @Test func statusRemovesSocketsOfDeadProcesses() async throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // Beyond any pid_max: certainly not a running process.
        _ = FileManager.default.createFile(atPath: "\(dir)/2147483600.sock", contents: Data())
        let run = try await runCLI(["status"], controlDirectory: dir, within: 10)
        #expect(run.status == 0)
        #expect(run.stdout.contains("no running nbs-mobility"))
        #expect(ControlDirectory.sockets(in: dir).isEmpty)
    }
}
