import ArgumentParser
import Crypto
import Foundation
import Logging
import NameBasedSockets
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

@main
struct NBSMobility: AsyncParsableCommand {
    /// Library logs go to stderr at NBS_LOG_LEVEL (trace, debug, info, notice, warning, error; default info).
    static func main() async {
        let level = ProcessInfo.processInfo.environment["NBS_LOG_LEVEL"].flatMap(Logger.Level.init(rawValue:)) ?? .info
        LoggingSystem.bootstrap { ViewAwareLogHandler(label: $0, level: level) }
        // A reader that goes away (`| head`) must end this process with an error, not a signal.
        signal(SIGPIPE, SIG_IGN)
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            exit(withError: error)
        }
    }

    static let configuration = CommandConfiguration(
        commandName: "nbs-mobility",
        abstract: "Name Based Sockets: multipath, mobile sessions opened by name.",
        subcommands: [Serve.self, Connect.self, Cat.self, Status.self, Proxy.self, Monitor.self, Identity.self]
    )
}

struct CommonOptions: ParsableArguments {
    @Option(name: .long, help: "This host's name, sent in the handshake; 'auto' (the default): the --identity key's self-certifying name.")
    var name: String = "auto"

    @OptionGroup var verification: VerificationOptions

    @Flag(name: .long, help: "Print one JSON object per session as the last line.")
    var json = false

    @Option(name: .long, help: "Subflows over tcp (default) or udp; both ends must use the same.")
    var transport: NBSOptions.Transport = .tcp

    @Option(name: .long, help: "Most subflows per session.")
    var maxSubflows = 4

    @Option(name: .long, help: "Event-loop threads for this process's sessions (default: one per core). Load generators sharing a machine with the server under test use fewer.")
    var eventLoops: Int?

    @Flag(name: .long, help: "With --policy aggregate: every subflow carries data, including siblings between the same two interfaces (by default one of them does and the others stand by).")
    var allSiblingsCarry = false

    @Option(name: .customLong("local"), help: "A local address to open subflows from (repeatable); default: every usable address.")
    var localAddresses: [String] = []

    @Option(name: .long, help: "Bytes a session may hold written but unacknowledged (suffixes K, M; default 8M). Small values keep many slow sessions from queueing minutes of data.")
    var sendBuffer: String?

    @Flag(name: .long, help: "No TCP Fast Open on TCP subflows (by default OPEN and JOIN go in the SYN where net.ipv4.tcp_fastopen allows it and the kernel holds the server's cookie).")
    var noFastOpen = false

    @Option(name: .long, help: "How long an open waits for an attempt to reach the peer before the next pair of addresses' starts beside it, in ms (Happy Eyeballs, RFC 8305; default 250; 0: one pair at a time).")
    var openAttemptDelay: Int?

    @Option(name: .customLong("tcp-rto-min"), help: "The least retransmission timeout of this end's TCP subflows, in ms (Linux 6.15 and later; 0: the kernel's own, 200 ms; default: the library's).")
    var tcpRTOMin: Int?

    mutating func validate() throws {
        name = try verification.localName(name)
        if let tcpRTOMin, !(0...1000).contains(tcpRTOMin) {
            throw ValidationError("--tcp-rto-min takes 0 to 1000 milliseconds, not \(tcpRTOMin)")
        }
        if let openAttemptDelay, !(0...10_000).contains(openAttemptDelay) {
            throw ValidationError("--open-attempt-delay takes 0 to 10000 milliseconds, not \(openAttemptDelay)")
        }
        if let sendBuffer, (parseByteCount(sendBuffer) ?? 0) < 65536 { throw ValidationError("--send-buffer must be a byte count of at least 64K") }
        if let eventLoops, !(1...256).contains(eventLoops) { throw ValidationError("--event-loops must be 1...256") }
    }

    func options(policy: MultipathPolicy = .aggregate) throws -> NBSOptions {
        var options = NBSOptions()
        try verification.apply(to: &options)
        options.policy = policy
        options.transport = transport
        options.maxSubflows = maxSubflows
        options.tcpFastOpen = !noFastOpen
        if let openAttemptDelay { options.openAttemptDelay = openAttemptDelay > 0 ? .milliseconds(Int64(openAttemptDelay)) : nil }
        if let tcpRTOMin { options.tcpMinimumRTO = tcpRTOMin > 0 ? .milliseconds(Int64(tcpRTOMin)) : nil }
        options.siblingSubflowsStandBy = !allSiblingsCarry
        if let eventLoops { options.eventLoopGroup = CommonOptions.group(threads: eventLoops) }
        if let bytes = sendBuffer.flatMap(parseByteCount) { options.sendBufferCapacity = bytes }
        if !localAddresses.isEmpty {
            options.localAddresses = try localAddresses.map {
                do { return try SocketAddress(ipAddress: $0, port: 0) } catch { throw ValidationError("--local \($0) is not an IP address") }
            }
        }
        return options
    }
}

extension CommonOptions {
    /// One group per process, made at the first call: every session of the command shares it.
    private static let groups = NIOLockedValueBox<[Int: MultiThreadedEventLoopGroup]>([:])
    static func group(threads: Int) -> MultiThreadedEventLoopGroup {
        groups.withLockedValue { groups in
            if let group = groups[threads] { return group }
            let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
            groups[threads] = group
            return group
        }
    }
}

extension MultipathPolicy: ExpressibleByArgument {}
extension NBSOptions.Transport: ExpressibleByArgument {}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Accept sessions for --name and sink or echo their bytes, showing them live.")

    @OptionGroup var common: CommonOptions
    @OptionGroup var display: ViewOptions
    @Option(name: .long, help: "TCP port to listen on.") var port: Int
    @Flag(name: .long, help: "Read and discard, reporting the checksum.") var sink = false
    @Flag(name: .long, help: "Send every byte back.") var echo = false
    @Flag(name: .long, help: "Serve one session, then exit with its status.") var once = false
    @Option(name: .long, help: "With --once: write the bytes received per 100 ms to FILE, one 't_ms bytes' line per bin from the accept.")
    var timeline: String?

    func validate() throws {
        guard sink != echo else { throw ValidationError("choose exactly one of --sink or --echo") }
        if timeline != nil, !once { throw ValidationError("--timeline needs --once (one session, one file)") }
        guard (1...65535).contains(port) else { throw ValidationError("--port must be 1...65535") }
    }

    func run() async throws {
        let listener: Listener
        do {
            listener = try await NBS.listen(localName: common.name, port: port, options: try common.options())
        } catch let error as NBSError {
            throw CLIError.fromListen(error, port: port)
        }
        let console = await Console.start(command: "serve", localName: common.name, port: listener.port,
                                          view: display.resolved(json: common.json), control: !display.noControl)
        if !common.json {
            console.view.printPermanent("listening as \(common.name) on port \(listener.port) (\(listener.boundAddresses.map(\.description).joined(separator: ", ")))")
        }
        if once {
            let report: TransferReport
            do {
                report = await serveSession(try await listener.accept(), console: console)
            } catch {
                await console.stop()
                throw error
            }
            await listener.close()
            await console.stop()
            if !report.completed { throw ExitCode(1) }
            return
        }
        // Discarding: a plain task group keeps every finished child until it is awaited, which this
        // loop never does, so a long-running serve grew by each session it had ever served.
        try await withThrowingDiscardingTaskGroup { group in
            while true {
                let session = try await listener.accept()
                group.addTask { _ = await serveSession(session, console: console) }
            }
        }
    }

    private func serveSession(_ session: Session, console: Console) async -> TransferReport {
        let tracked = console.registry.track(session, role: "server", progress: .received)
        var report = TransferReport(role: "server", session: session)
        var receiver = ReceiveMeter()
        var trace = timeline.map { _ in ReceiveTimeline(origin: report.started) }
        do {
            while let segments = try await session.readSegments() {
                let count = receiver.record(segments)
                trace?.record(count)
                tracked.addProgress(count)
                if echo { for segment in segments { try await session.write(segment) } }
            }
            try await session.close()
            report.completed = true
        } catch {
            report.error = "\(error)"
            await session.abort(reason: "\(error)")
        }
        report.fill(receiver: receiver)
        if let timeline, let trace {
            do {
                try trace.text.write(toFile: timeline, atomically: true, encoding: .utf8)
            } catch {
                report.error = (report.error.map { $0 + "; " } ?? "") + "--timeline \(timeline): \(error)"
                report.completed = false
            }
        }
        await report.finish(tracked)
        console.registry.forget(tracked)
        console.view.printPermanent(report.text(json: common.json))
        return report
    }
}

struct Connect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Open a session to PEER_NAME:PORT and send deterministic pseudo-random data.")

    @OptionGroup var common: CommonOptions
    @OptionGroup var display: ViewOptions
    @Argument(help: "The peer, as NAME:PORT.") var peer: String
    @Option(name: .long, help: "Bytes to send (suffixes K, M, G: powers of 1024).") var bytes: String?
    @Option(name: .long, help: "Send for this many seconds.") var duration: Double?
    @Option(name: .long, help: "aggregate, handover or interactive.") var policy: MultipathPolicy = .aggregate
    @Option(name: .long, help: "Send nothing: hold each session open and idle for this many seconds, counted from when all --sessions are open, then close it.")
    var hold: Double?
    @Option(name: .long, help: "Run this many sessions at once, each sending --bytes or for --duration; one report each.")
    var sessions = 1
    @Option(name: .long, help: "With --sessions: at most this many opens in progress at once (a listener refuses handshakes beyond its limit).")
    var openConcurrency = 64
    @Flag(name: .long, help: "With --sessions: no session sends before all are open, so they share the path from the same instant (--hold implies it).")
    var startTogether = false

    func validate() throws {
        guard [bytes != nil, duration != nil, hold != nil].filter({ $0 }).count == 1 else {
            throw ValidationError("give exactly one of --bytes, --duration or --hold")
        }
        if let bytes, parseByteCount(bytes) == nil { throw ValidationError("--bytes \(bytes) is not a byte count") }
        if let duration, !(duration > 0) { throw ValidationError("--duration must be positive") }
        if let hold, !(hold >= 0) { throw ValidationError("--hold must be zero or more seconds") }
        guard (1...100_000).contains(sessions) else { throw ValidationError("--sessions must be 1...100000") }
        guard openConcurrency >= 1 else { throw ValidationError("--open-concurrency must be at least 1") }
        _ = try parsePeer(peer)
    }

    func run() async throws {
        let (peerName, port) = try parsePeer(peer)
        let options = try common.options(policy: policy)
        let open = { @Sendable () async throws -> Session in
            do {
                return try await NBS.open(localName: common.name, peerName: peerName, port: port, options: options)
            } catch let error as NBSError {
                throw CLIError.from(error, peer: peer)
            }
        }
        guard sessions > 1 else {
            let session = try await open()
            let console = await Console.start(command: "connect", localName: common.name, port: nil,
                                              view: display.resolved(json: common.json), control: !display.noControl)
            let report = await transfer(session, console: console)
            await console.stop()
            print(report.text(json: common.json))
            if !report.completed { throw ExitCode(1) }
            return
        }
        // Many at once (a soak, a scale test): each prints its report as it ends.
        let console = await Console.start(command: "connect", localName: common.name, port: nil,
                                          view: display.resolved(json: common.json), control: !display.noControl)
        let json = common.json
        let opening = AsyncLimiter(openConcurrency)
        let allOpen = (startTogether || hold != nil) ? OpenBarrier(sessions) : nil
        let failed = await withTaskGroup(of: Bool.self) { group in
            for _ in 0..<sessions {
                group.addTask {
                    do {
                        let session: Session
                        do {
                            session = try await opening.run(open)
                        } catch {
                            await allOpen?.arrive(opened: false)
                            throw error
                        }
                        await allOpen?.arrive(opened: true)
                        await allOpen?.wait()
                        let report = await transfer(session, console: console)
                        console.view.printPermanent(report.text(json: json))
                        return !report.completed
                    } catch {
                        let object: [String: Any] = ["completed": false, "role": "client", "error": "\(error)"]
                        let text = json ? String(decoding: try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
                            : "client: FAILED: \(error)"
                        console.view.printPermanent(text)
                        return true
                    }
                }
            }
            return await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
        await console.stop()
        if failed > 0 {
            FileHandle.standardError.write(Data("nbs-mobility: \(failed) of \(sessions) sessions failed\n".utf8))
            throw ExitCode(1)
        }
    }

    /// One session's transfer: deterministic data out, anything echoed back read and checksummed.
    private func transfer(_ session: Session, console: Console) async -> TransferReport {
        let limit = bytes.flatMap(parseByteCount)
        let tracked = console.registry.track(session, role: "client", progress: .sent, expectedBytes: limit)
        var report = TransferReport(role: "client", session: session)
        var generator = PatternGenerator()
        var sender = SHA256()
        let deadline = duration.map { ContinuousClock.now + .milliseconds(Int($0 * 1000)) }
        let reader = Task { () -> (bytes: Int, digest: String) in
            var meter = ReceiveMeter()
            while let segments = try await session.readSegments() { meter.record(segments) }
            return (meter.bytes, meter.digest)
        }
        do {
            var sent = 0
            if let hold { try await Task.sleep(for: .milliseconds(Int(hold * 1000))) }
            while hold == nil {
                if let limit, sent >= limit { break }
                if let deadline, ContinuousClock.now >= deadline { break }
                let size = min(256 * 1024, limit.map { $0 - sent } ?? Int.max)
                let chunk = generator.next(size)
                chunk.withUnsafeReadableBytes { sender.update(bufferPointer: $0) }
                try await session.write(chunk)
                sent += size
                tracked.addProgress(size)
            }
            report.bytes = sent
            report.sha256 = hex(sender.finalize())
            await session.finish()
            let echoed = try await reader.value
            try await session.close()
            report.completed = true
            if echoed.bytes > 0 {
                report.echoBytes = echoed.bytes
                report.echoSHA256 = echoed.digest
            }
        } catch {
            reader.cancel()
            report.error = "\(error)"
            await session.abort(reason: "\(error)")
        }
        report.seconds = report.elapsed
        await report.finish(tracked)
        if sessions > 1 { console.registry.forget(tracked) }
        return report
    }
}

/// NAME:PORT, [IPv6]:PORT.
func parsePeer(_ peer: String) throws -> (name: String, port: Int) {
    guard let colon = peer.lastIndex(of: ":"), let port = Int(peer[peer.index(after: colon)...]), (1...65535).contains(port) else {
        throw ValidationError("PEER must be NAME:PORT with a port in 1...65535, got '\(peer)'")
    }
    var host = String(peer[..<colon])
    if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    guard !host.isEmpty else { throw ValidationError("PEER must be NAME:PORT, got '\(peer)': the name is empty") }
    return (host, port)
}

/// "16M", "64MiB", "1048576", "1G".
func parseByteCount(_ text: String) -> Int? {
    var digits = text.trimmingCharacters(in: .whitespaces).uppercased()
    for suffix in ["IB", "B"] where digits.hasSuffix(suffix) && digits.count > suffix.count { digits.removeLast(suffix.count); break }
    var multiplier = 1
    if let last = digits.last, let shift = ["K": 10, "M": 20, "G": 30][String(last)] {
        multiplier = 1 << shift
        digits.removeLast()
    }
    guard let value = Int(digits), value >= 0 else { return nil }
    return value * multiplier
}

/// A deterministic byte stream (xorshift64*), so both ends and scripts can reproduce it.
struct PatternGenerator {
    private var state: UInt64 = 0x9E37_79B9_7F4A_7C15

    mutating func next(_ count: Int) -> ByteBuffer {
        var buffer = ByteBufferAllocator().buffer(capacity: count)
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { raw in
            var s = state
            var i = 0
            while i + 8 <= count {
                s ^= s >> 12
                s ^= s << 25
                s ^= s >> 27
                raw.storeBytes(of: (s &* 0x2545_F491_4F6C_DD1D).littleEndian, toByteOffset: i, as: UInt64.self)
                i += 8
            }
            while i < count {
                s ^= s >> 12
                s ^= s << 25
                s ^= s >> 27
                raw[i] = UInt8(truncatingIfNeeded: s &* 0x2545_F491_4F6C_DD1D)
                i += 1
            }
            state = s
            return count
        }
        return buffer
    }
}

func hex(_ digest: some Sequence<UInt8>) -> String { digest.map { String(format: "%02x", $0) }.joined() }
