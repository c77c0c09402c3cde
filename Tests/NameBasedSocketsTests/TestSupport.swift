import Crypto
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import NameBasedSockets

/// Options for loopback sessions: several loopback addresses stand in for several interfaces.
func loopbackOptions(locals: [String] = ["127.0.0.1"], peers: [String: [String]] = ["server.test": ["127.0.0.1"]]) -> NBSOptions {
    var options = NBSOptions()
    options.localAddresses = locals.map { try! SocketAddress(ipAddress: $0, port: 0) }
    options.resolver = StaticResolver(peers)
    options.closeTimeout = .seconds(30)
    return options
}

func listener(_ name: String = "server.test", options: NBSOptions = NBSOptions()) async throws -> Listener {
    // Port 0: the kernel picks a free port, so concurrent runs never collide.
    try await NBS.listen(localName: name, port: 0, options: options)
}

/// A listener on loopback and one session opened to it by name: the listener and both ends.
func connectedPair(listenerOptions: NBSOptions = NBSOptions(), options: NBSOptions = loopbackOptions()) async throws
    -> (server: Listener, client: Session, accepted: Session)
{
    let server = try await listener(options: listenerOptions)
    let accepting = Task { try await server.accept() }
    let client = try await NBS.open(localName: "client.test", peerName: "server.test", port: server.port, options: options)
    let accepted = try await withTimeout(10) { try await accepting.value }
    return (server, client, accepted)
}

/// Deterministic bytes.
func pattern(_ count: Int, seed: UInt64 = 1) -> ByteBuffer {
    var bytes = [UInt8](repeating: 0, count: count)
    var s = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    bytes.withUnsafeMutableBufferPointer { out in
        for i in 0..<count {
            s ^= s << 13
            s ^= s >> 7
            s ^= s << 17
            out[i] = UInt8(truncatingIfNeeded: s)
        }
    }
    return ByteBuffer(bytes: bytes)
}

func sha256(_ buffer: ByteBuffer) -> [UInt8] {
    buffer.withUnsafeReadableBytes { Array(SHA256.hash(data: $0)) }
}

/// Reads to the end of the stream, hashing as it goes.
func drain(_ session: Session) async throws -> (bytes: Int, digest: [UInt8]) {
    var hash = SHA256()
    var total = 0
    while let chunk = try await session.read() {
        total += chunk.readableBytes
        chunk.withUnsafeReadableBytes { hash.update(bufferPointer: $0) }
    }
    return (total, Array(hash.finalize()))
}

/// The listener's next session, read to its end and closed: its byte count.
func drainNextSession(_ server: Listener) -> Task<Int, any Error> {
    Task {
        let session = try await server.accept()
        let (bytes, _) = try await drain(session)
        try await session.close()
        return bytes
    }
}

/// A bound on how long a test step may take, so a hang fails the test instead of the suite. On
/// timeout it cancels the step and returns without waiting for it: a step blocked on something that
/// does not heed cancellation (a NIO future's `get()`) would otherwise hold the test, and with it
/// the whole run, forever (seen: a test awaiting an `accept` that never came).
func withTimeout<T: Sendable>(_ seconds: Double, _ what: String = "operation", _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    let outcome = AsyncFirst<T>()
    let work = Task { outcome.resolve(await Result { try await body() }) }
    let timer = Task {
        try? await Task.sleep(for: .milliseconds(Int(seconds * 1000)))
        outcome.resolve(.failure(TimeoutError(what: what, seconds: seconds)))
    }
    defer {
        work.cancel()
        timer.cancel()
    }
    return try await outcome.value
}

/// The first of several results, for one waiter.
final class AsyncFirst<T: Sendable>: Sendable {
    private struct State {
        var result: Result<T, any Error>?
        var waiter: CheckedContinuation<T, any Error>?
    }
    private let state = Mutex(State())

    func resolve(_ result: Result<T, any Error>) {
        let waiter = state.withLock { state -> CheckedContinuation<T, any Error>? in
            guard state.result == nil else { return nil }
            state.result = result
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(with: result)
    }

    var value: T {
        get async throws {
            try await withCheckedThrowingContinuation { continuation in
                let ready = state.withLock { state -> Result<T, any Error>? in
                    if state.result == nil { state.waiter = continuation }
                    return state.result
                }
                if let ready { continuation.resume(with: ready) }
            }
        }
    }
}

extension Result where Failure == any Error {
    init(catching body: () async throws -> Success) async {
        do { self = .success(try await body()) } catch { self = .failure(error) }
    }
}

/// Starts `call` and cancels it `rounds` times, at once and after it has waited a while in turn (so
/// the cancellation reaches the loop both before and after the call), expecting CancellationError.
func expectCancelledWaits<T: Sendable>(rounds: Int, _ call: @escaping @Sendable () async throws -> T) async throws {
    for round in 0..<rounds {
        let waiting = Task { try await call() }
        if round % 2 == 1 { try await Task.sleep(for: .milliseconds(20)) }
        waiting.cancel()
        await #expect(throws: CancellationError.self) { try await withTimeout(5) { try await waiting.value } }
    }
}

/// Writes `bytes` from a task, runs `whileWaiting` once that write has waited 300 ms, then cancels
/// the task, which writes once more when its first write is over. Returns whether the first write
/// returned normally and whether the second threw `CancellationError`.
func cancelWhileWriting(_ session: Session, _ bytes: ByteBuffer, whileWaiting: () async throws -> Void = {}) async throws -> (Bool, Bool) {
    let firstDone = ManagedCounter()
    let writer = Task { () -> (Bool, Bool) in
        let firstReturned = (try? await session.write(bytes)) != nil
        firstDone.add(1)
        do {
            try await session.write(ByteBuffer(string: "from a cancelled task"))
            return (firstReturned, false)
        } catch {
            return (firstReturned, error is CancellationError)
        }
    }
    try await Task.sleep(for: .milliseconds(300))
    #expect(firstDone.value == 0, "the write should wait for buffer space")
    try await whileWaiting()
    writer.cancel()
    return try await withTimeout(5) { await writer.value }
}

struct TimeoutError: Error, CustomStringConvertible {
    let what: String
    let seconds: Double
    var description: String { "\(what) did not finish within \(seconds) s" }
}

/// Closes both ends of a session together (each end's close waits for the other's), then the listener.
func closeBothEnds(_ client: Session, _ accepted: Session, listener: Listener) async throws {
    async let acceptedClosed: Void = accepted.close()
    try await client.close()
    try await acceptedClosed
    await listener.close()
}

@Suite("Test support")
struct TestSupportTests {
    /// Not awaited: were `withTimeout` to wait for its step, this test would hang instead of failing.
    @Test("withTimeout returns at its deadline while its step ignores cancellation")
    func timeoutDoesNotWaitForItsStep() async throws {
        let never = MultiThreadedEventLoopGroup.singleton.next().makePromise(of: Void.self)
        let timedOut = ManagedCounter()
        Task {
            do {
                try await withTimeout(0.2) { try await never.futureResult.get() }
            } catch is TimeoutError {
                timedOut.add(1)
            }
        }
        try? await waitFor("the timeout", seconds: 5) { timedOut.value == 1 }
        #expect(timedOut.value == 1)
        never.succeed(())
    }
}
